//! The bench's report, printed: a table for people, JSON for tools.

use std::io::Write;

use super::*;

impl BenchReport {
    /// The results as a table, then the ratio and each target, met or missed.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "agora bench: {} markets, {} commands a phase after {} resting orders a market, seed {}, \
             window {}, {} streams at R{}, NATS {}",
            self.markets,
            self.orders_per_phase,
            self.resting_per_market,
            self.seed,
            self.window,
            self.storage,
            self.replicas,
            self.nats
        )?;
        writeln!(
            out,
            "{:<26} {:>9} {:>8} {:>11} {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "phase",
            "commands",
            "seconds",
            "commands/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "node CPU",
            "nats CPU",
            "bench CPU",
            "per batch",
            "reports/cmd"
        )?;
        let ms = |us: u64| us as f64 / 1000.0;
        for p in &self.phases {
            let label = match (p.name.as_str(), p.target_rate) {
                ("raw", _) => "raw JetStream, max".to_string(),
                ("raw_paced", Some(rate)) => format!("raw JetStream at {rate:.0}/s"),
                (_, None) => "end to end, max".to_string(),
                (_, Some(rate)) => format!("end to end at {rate:.0}/s"),
            };
            let nats = p
                .nats_cpu_ms_per_1000
                .map_or("-".to_string(), |v| format!("{v:.1}"));
            let per_batch = p.batches.filter(|&b| b > 0).map_or("-".to_string(), |b| {
                format!("{:.1}", p.commands as f64 / b as f64)
            });
            let reports = p.report_messages.map_or("-".to_string(), |r| {
                format!("{:.2}", r as f64 / p.commands.max(1) as f64)
            });
            writeln!(
                out,
                "{label:<26} {:>9} {:>8.2} {:>11.0} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>9.1} {:>9} {:>9.1} {:>9} {:>11}",
                p.commands,
                p.seconds,
                p.commands_per_sec,
                ms(p.latency_us.p50),
                ms(p.latency_us.p99),
                ms(p.latency_us.p999),
                ms(p.latency_us.max),
                p.node_cpu_ms_per_1000,
                nats,
                p.bench_cpu_ms_per_1000,
                per_batch,
                reports,
            )?;
        }
        writeln!(
            out,
            "(CPU: milliseconds of CPU time per 1,000 commands; per batch: commands per journal \
             message, that is per batch the node processed; reports/cmd: execution-report \
             messages, one per account per batch, per command)"
        )?;
        writeln!(
            out,
            "ratio, end to end max / raw ceiling: {:.2}",
            self.ratio
        )?;
        if let Some(raw) = self.phases.iter().find(|p| p.name == "raw_paced") {
            writeln!(
                out,
                "JetStream alone at the paced rate: p50 {:.2} ms, p99 {:.2} ms (the floor under the \
                 end-to-end latency)",
                ms(raw.latency_us.p50),
                ms(raw.latency_us.p99)
            )?;
        }
        for t in &self.targets {
            let value = match t.unit {
                "us" => format!("{:.2} ms", t.value / 1000.0),
                _ => format!("{:.0}%", t.value * 100.0),
            };
            writeln!(
                out,
                "target: {}: {} ({value})",
                t.what,
                if t.met { "met" } else { "MISSED" }
            )?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
