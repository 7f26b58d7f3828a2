fn main() -> std::process::ExitCode {
    kit::service::main::<frontend_ui::FrontendUi>()
}
