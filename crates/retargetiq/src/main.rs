fn main() -> std::process::ExitCode {
    retargetiq::main()
}
