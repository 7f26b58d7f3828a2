fn main() -> std::process::ExitCode {
    kit::service::main::<event_processor::EventProcessor>()
}
