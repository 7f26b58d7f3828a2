fn main() -> std::process::ExitCode {
    kit::service::main::<feature_store::FeatureStore>()
}
