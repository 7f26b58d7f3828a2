fn main() -> std::process::ExitCode {
    kit::service::main::<ranking::Ranking>()
}
