fn main() -> std::process::ExitCode {
    kit::service::main::<recommendation_api::RecommendationApi>()
}
