fn main() -> std::process::ExitCode {
    kit::service::main::<rl_offer::RlOffer>()
}
