fn main() -> std::process::ExitCode {
    kit::service::main::<retrieval::Retrieval>()
}
