//! docker-compose.yml and the code must not drift apart: every service the file runs is one of
//! ours, on its contract port, built from its Dockerfile target, health-checked; every
//! environment variable it sets is one the code reads; the topics it creates are the topic
//! table's, with its partition counts. (CI also validates the file with `docker-compose config`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kit::Service;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("docker-compose.yml at the top level");
    YamlLoader::load_from_str(&text).expect("valid YAML").remove(0)
}

/// `map[key]`, following `<<` merge keys (which the YAML loader leaves as they are).
fn get<'a>(map: &'a Yaml, key: &str) -> &'a Yaml {
    let direct = &map[key];
    if !direct.is_badvalue() {
        return direct;
    }
    match &map["<<"] {
        Yaml::Hash(_) => get(&map["<<"], key),
        _ => direct,
    }
}

/// The keys of a mapping, merge keys resolved.
fn keys(map: &Yaml) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Yaml::Hash(h) = map {
        for (k, v) in h {
            match k.as_str() {
                Some("<<") => out.extend(keys(v)),
                Some(k) => {
                    out.insert(k.to_owned());
                }
                None => {}
            }
        }
    }
    out
}

/// Every Rust source of the workspace, concatenated.
fn sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).expect("readable").flatten() {
            let path = entry.path();
            if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).expect("readable"));
            }
        }
    }
    let mut out = String::new();
    for dir in ["crates", "services"] {
        walk(&root().join(dir), &mut out);
    }
    out
}

fn contract_ports() -> Vec<(&'static str, u16)> {
    vec![
        (user_activity::UserActivity::NAME, user_activity::UserActivity::DEFAULT_PORT),
        (order::Order::NAME, order::Order::DEFAULT_PORT),
        (event_processor::EventProcessor::NAME, event_processor::EventProcessor::DEFAULT_PORT),
        (analytics::Analytics::NAME, analytics::Analytics::DEFAULT_PORT),
        (feature_store::FeatureStore::NAME, feature_store::FeatureStore::DEFAULT_PORT),
        (retrieval::Retrieval::NAME, retrieval::Retrieval::DEFAULT_PORT),
        (ranking::Ranking::NAME, ranking::Ranking::DEFAULT_PORT),
        (rl_offer::RlOffer::NAME, rl_offer::RlOffer::DEFAULT_PORT),
        (recommendation_api::RecommendationApi::NAME, recommendation_api::RecommendationApi::DEFAULT_PORT),
        (frontend_ui::FrontendUi::NAME, frontend_ui::FrontendUi::DEFAULT_PORT),
    ]
}

#[test]
fn every_service_runs_on_its_contract_port_from_its_own_target() {
    let doc = compose();
    let services = &doc["services"];
    let ports = contract_ports();
    assert_eq!(ports.len(), retargetiq::SERVICES.len());
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).expect("docker/Dockerfile");
    for (name, port) in ports {
        assert!(retargetiq::SERVICES.contains(&name), "{name} is not in the CLI's service list");
        let svc = &services[name];
        assert!(!svc.is_badvalue(), "docker-compose.yml does not run {name}");
        let build = get(svc, "build");
        assert_eq!(build["target"].as_str(), Some(name), "{name}: build target");
        assert_eq!(build["dockerfile"].as_str(), Some("docker/Dockerfile"), "{name}: Dockerfile");
        assert!(dockerfile.contains(&format!("FROM runtime AS {name}\n")), "docker/Dockerfile has no target {name}");
        assert!(dockerfile.contains(&format!("EXPOSE {port}\n")), "docker/Dockerfile does not expose {port}");
        let mapped: Vec<&str> = get(svc, "ports").as_vec().expect("ports").iter().filter_map(Yaml::as_str).collect();
        // The contract port on the host, or a range of them to scale out (`--scale`).
        let var = format!("{}_PORT", name.to_uppercase().replace('-', "_"));
        assert_eq!(mapped, vec![format!("${{{var}:-{port}}}:{port}")], "{name}: port mapping");
        let volumes: Vec<&str> =
            get(svc, "volumes").as_vec().expect("volumes").iter().filter_map(Yaml::as_str).collect();
        let lock_dir = get(get(svc, "environment"), "RETARGETIQ_LOCK_DIR").as_str().expect("RETARGETIQ_LOCK_DIR");
        assert_eq!(volumes, vec![format!("locks:{lock_dir}")], "{name}: one standby-lock directory for every replica");
        assert!(
            dockerfile.contains(&format!("mkdir -p {lock_dir} && chown retargetiq {lock_dir}")),
            "the lock directory"
        );
        let env = get(svc, "environment");
        assert_eq!(get(env, "HTTP_PORT").as_i64(), Some(i64::from(port)), "{name}: HTTP_PORT");
        assert_eq!(get(env, "KAFKA_BOOTSTRAP_SERVERS").as_str(), Some("kafka:19092"), "{name}: broker address");
        let check: Vec<&str> =
            get(svc, "healthcheck")["test"].as_vec().expect("a health check").iter().filter_map(Yaml::as_str).collect();
        assert_eq!(check, vec!["CMD", name, "healthcheck"], "{name}: health check");
        let depends = keys(get(svc, "depends_on"));
        assert!(depends.contains("kafka") && depends.contains("kafka-init"), "{name}: depends on {depends:?}");
        assert_eq!(get(svc, "restart").as_str(), Some("unless-stopped"), "{name}: restart policy");
    }
    // Nothing else but the broker, its topic creation and the monitoring profile.
    let extra: BTreeSet<String> = keys(services)
        .into_iter()
        .filter(|s| !retargetiq::SERVICES.contains(&s.as_str()))
        .filter(|s| !matches!(s.as_str(), "kafka" | "kafka-init" | "prometheus" | "grafana"))
        .collect();
    assert!(extra.is_empty(), "unknown services in docker-compose.yml: {extra:?}");
}

#[test]
fn every_environment_variable_is_one_the_code_reads() {
    let doc = compose();
    let code = sources();
    for name in retargetiq::SERVICES {
        let env = get(&doc["services"][name], "environment");
        for var in keys(env) {
            assert!(code.contains(&format!("\"{var}\"")), "{name} sets {var}, which no code reads");
        }
    }
    // The UI reaches every other service by its Compose name and contract port.
    let ui = get(&doc["services"]["frontend-ui"], "environment");
    for (name, port) in contract_ports().into_iter().filter(|(n, _)| *n != "frontend-ui") {
        let var = format!("{}_URL", name.to_uppercase().replace('-', "_"));
        assert_eq!(get(ui, &var).as_str(), Some(format!("http://{name}:{port}").as_str()), "frontend-ui: {var}");
    }
}

#[test]
fn the_topics_created_are_the_topic_table() {
    let doc = compose();
    let script: String = doc["services"]["kafka-init"]["command"]
        .as_vec()
        .expect("kafka-init command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let specs: BTreeSet<String> = script
        .split_whitespace()
        .filter(|w| w.contains("-topic:"))
        .map(|w| w.trim_end_matches(';').to_owned())
        .collect();
    let expected: BTreeSet<String> = events::Topic::ALL
        .iter()
        .map(|t| {
            let configs: Vec<String> = t.configs().iter().map(|(k, v)| format!(":{k}={v}")).collect();
            format!("{}:{}{}", t.name(), t.default_partitions(), configs.concat())
        })
        .collect();
    assert_eq!(specs, expected);
}
