fn main() -> std::process::ExitCode {
    kit::service::main::<order::Order>()
}
