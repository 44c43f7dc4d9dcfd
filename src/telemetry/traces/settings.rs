//! The settings of trace export (`[tracing]` in the node's configuration, the standard
//! `OTEL_*` variables for every command): this module's own type, which `config` reads from
//! its layers. It must never read a file or the environment by itself: `apply_otel_env` is
//! handed the variables.

use serde::{Deserialize, Serialize};

/// How traces are exported: OTLP to a collector (Jaeger takes it on 4317 and 4318). Off unless
/// an endpoint is given. The standard variables override what the files say (see
/// `apply_otel_env`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// `false` turns tracing off whatever else says (`OTEL_SDK_DISABLED=true` does too).
    pub enabled: bool,
    /// The collector, `http://host:4317` (gRPC) or `http://host:4318` (HTTP; `/v1/traces` is
    /// appended unless the path already ends with it). Empty: no exporter.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// `service.name` of the spans.
    pub service_name: String,
    pub sampler: Sampler,
    /// The ratio of the `traceidratio` samplers, 0 to 1.
    pub sampling_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> TracingConfig {
        TracingConfig {
            enabled: true,
            endpoint: String::new(),
            protocol: OtlpProtocol::Grpc,
            service_name: "agora-node".into(),
            sampler: Sampler::ParentbasedTraceidratio,
            sampling_ratio: 1.0,
        }
    }
}

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    #[serde(alias = "http/protobuf")]
    Http,
}

/// Which traces are kept: the values of `OTEL_TRACES_SAMPLER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    /// The parent's decision when there is one (a client's `traceparent`), else the ratio.
    ParentbasedTraceidratio,
}

impl Sampler {
    pub const NAMES: &'static str = "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio";

    pub fn parse(name: &str) -> Option<Sampler> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Traceidratio,
            "parentbased_always_on" => Sampler::ParentbasedAlwaysOn,
            "parentbased_always_off" => Sampler::ParentbasedAlwaysOff,
            "parentbased_traceidratio" => Sampler::ParentbasedTraceidratio,
            _ => return None,
        })
    }
}

impl TracingConfig {
    /// The client's defaults (`agora order`): off until `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub fn client() -> TracingConfig {
        TracingConfig {
            service_name: "agora-client".into(),
            ..TracingConfig::default()
        }
    }

    /// Whether spans are exported at all.
    pub fn active(&self) -> bool {
        self.enabled && !self.endpoint.is_empty()
    }

    /// Applies the standard OpenTelemetry variables, read through `var`:
    /// `OTEL_SDK_DISABLED=true` turns tracing off; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (else
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`), `OTEL_SERVICE_NAME`,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` replace their keys. Then checks.
    pub fn apply_otel_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            self.enabled = false;
        }
        if let Some(endpoint) =
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            self.endpoint = endpoint.trim().to_string();
        }
        let protocol_var = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|name| var(name).map(|v| (name, v)));
        if let Some((name, value)) = protocol_var {
            self.protocol = match value.trim().to_ascii_lowercase().as_str() {
                "grpc" => OtlpProtocol::Grpc,
                "http/protobuf" | "http" => OtlpProtocol::Http,
                other => {
                    return Err(format!(
                        "{name}={other:?}: use grpc or http/protobuf (http/json is not built in)"
                    ));
                }
            };
        }
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            self.service_name = name.trim().to_string();
        }
        if let Some(name) = var("OTEL_TRACES_SAMPLER") {
            self.sampler = Sampler::parse(&name).ok_or_else(|| {
                format!(
                    "OTEL_TRACES_SAMPLER={name:?}: use one of {}",
                    Sampler::NAMES
                )
            })?;
        }
        if let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG") {
            self.sampling_ratio = arg.trim().parse().map_err(|_| {
                format!("OTEL_TRACES_SAMPLER_ARG={arg:?}: give the sampling ratio, 0 to 1")
            })?;
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "tracing.sampling_ratio = {}: use 0 to 1",
                self.sampling_ratio
            ));
        }
        if self.service_name.is_empty() {
            return Err(
                "tracing.service_name is empty: name the service its spans belong to".into(),
            );
        }
        let endpoint = &self.endpoint;
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            let hint = if endpoint.starts_with("https://") {
                "this build speaks plain http:// to the collector (no TLS): run a collector or agent next to the node"
            } else {
                "give a URL like http://localhost:4317 (gRPC) or http://localhost:4318 (HTTP)"
            };
            return Err(format!("tracing.endpoint {endpoint:?}: {hint}"));
        }
        Ok(())
    }
}
