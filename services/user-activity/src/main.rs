fn main() -> std::process::ExitCode {
    kit::service::main::<user_activity::UserActivity>()
}
