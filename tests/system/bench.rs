//! `agora bench --quick --json` as an operator runs it: its own nats-server, the node as a child
//! process, the four phases. Checks that every number is there and makes sense; never how fast
//! anything is (timings belong in BENCHMARKS.md, not in assertions).

use std::process::Command;

use serde_json::Value;

#[test]
fn a_quick_bench_reports_every_phase() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("latency.csv");
    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "bench",
            "--quick",
            "--json",
            "--markets",
            "2",
            "--latency-log",
        ])
        .arg(&log)
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

    // The latency log holds every timed command of every phase once, in publish order, with
    // the latencies the histograms were made of.
    let text = std::fs::read_to_string(&log).expect("the latency log was written");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("phase,market,command,published_us,latency_us")
    );
    let commands = phases[0]["commands"].as_u64().expect("commands") as usize;
    // Per phase: (market, command, published_us, latency_us) of each line.
    type Row = (u64, u64, u64, u64);
    let mut by_phase: Vec<(String, Vec<Row>)> = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 5, "{line}");
        let n = |i: usize| -> u64 { fields[i].parse().unwrap_or_else(|_| panic!("{line}")) };
        if by_phase.last().map(|(p, _)| p.as_str()) != Some(fields[0]) {
            by_phase.push((fields[0].to_string(), Vec::new()));
        }
        if let Some((_, rows)) = by_phase.last_mut() {
            rows.push((n(1), n(2), n(3), n(4)));
        }
    }
    let logged: Vec<&str> = by_phase.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(logged, names);
    for ((phase, rows), summary) in by_phase.iter().zip(phases) {
        assert_eq!(rows.len(), commands, "{phase}");
        assert!(
            rows.windows(2).all(|w| w[0].2 <= w[1].2),
            "{phase}: not in publish order"
        );
        let mut ids: Vec<(u64, u64)> = rows.iter().map(|r| (r.0, r.1)).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), commands, "{phase}: a command logged twice");
        let slowest = rows.iter().map(|r| r.3).max().unwrap_or(0);
        let max = summary["latency_us"]["max"].as_u64().expect("max");
        // The histogram keeps 3 significant digits.
        assert!(
            slowest.abs_diff(max) <= max / 500 + 1,
            "{phase}: slowest logged {slowest} µs, histogram max {max} µs"
        );
    }
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

    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "bench",
            "--quick",
            "--latency-log",
            "/nonexistent-dir/latency.csv",
        ])
        .output()
        .expect("agora bench starts");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot write the latency log /nonexistent-dir/latency.csv")
            && stderr.contains("writable directory"),
        "{stderr}"
    );
}
