//! `agora bench --quick --json` as an operator runs it: its own nats-server, the node as a child
//! process, the four phases. Checks that every number is there and makes sense; never how fast
//! anything is (timings belong in BENCHMARKS.md, not in assertions).

use std::process::Command;

use serde_json::Value;

#[test]
fn a_quick_bench_reports_every_phase() {
    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["bench", "--quick", "--json", "--markets", "2"])
        .env("AGORA_LOG", "warn")
        .output()
        .expect("agora bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "agora bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let json_line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    let report: Value = serde_json::from_str(json_line).expect("the JSON line parses");

    assert_eq!(report["markets"], 2);
    let phases = report["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["raw", "max", "paced", "raw_paced"]);
    for phase in phases {
        let name = &phase["name"];
        assert!(phase["commands"].as_u64() > Some(0), "{name}: {phase}");
        assert!(phase["seconds"].as_f64() > Some(0.0), "{name}: {phase}");
        assert!(
            phase["commands_per_sec"].as_f64() > Some(0.0),
            "{name}: {phase}"
        );
        let latency = &phase["latency_us"];
        let at = |k: &str| {
            latency[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: latency {k} missing in {phase}"))
        };
        assert!(at("p50") >= 1, "{name}: {phase}");
        assert!(at("p50") <= at("p99"), "{name}: {phase}");
        assert!(at("p99") <= at("p999"), "{name}: {phase}");
        assert!(at("p999") <= at("max"), "{name}: {phase}");
        assert!(
            phase["node_cpu_ms_per_1000"].as_f64() >= Some(0.0),
            "{name}: {phase}"
        );
        assert!(
            phase["bench_cpu_ms_per_1000"].as_f64() >= Some(0.0),
            "{name}: {phase}"
        );
        // The bench started the nats-server, so it knows its CPU time.
        assert!(
            phase["nats_cpu_ms_per_1000"].as_f64() >= Some(0.0),
            "{name}: {phase}"
        );
    }
    // The node did the work of the end-to-end phases, in batches it journaled.
    for phase in &phases[1..3] {
        assert!(phase["batches"].as_u64() > Some(0), "{phase}");
        assert!(phase["report_messages"].as_u64() > Some(0), "{phase}");
    }
    for phase in &phases[1..] {
        assert_eq!(phase["commands"], phases[0]["commands"]);
    }
    // The paced phases run at the same rate: half the measured maximum.
    assert!(phases[2]["target_rate"].as_f64() > Some(0.0));
    assert_eq!(phases[2]["target_rate"], phases[3]["target_rate"]);
    assert!(report["ratio"].as_f64() > Some(0.0), "{report}");
    let targets = report["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2);
    assert!(targets.iter().all(|t| t["met"].is_boolean()));
    // The human-readable table came first, naming each target met or missed.
    assert!(stdout.contains("raw JetStream, max"), "{stdout}");
    assert!(stdout.matches("target: ").count() == 2, "{stdout}");
}

#[test]
fn bad_options_are_refused_with_what_to_change() {
    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["bench", "--markets", "0"])
        .output()
        .expect("agora bench starts");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--markets 0: use 1 to 64"), "{stderr}");
}
