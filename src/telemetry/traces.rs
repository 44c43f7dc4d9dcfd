//! Traces: `tracing` spans exported as OpenTelemetry over OTLP (gRPC or HTTP), and the W3C
//! `traceparent`/`tracestate` carried in NATS message headers, so that a client's span, the
//! match in the market actor and the publishes of its outputs are one trace.
//!
//! `init` installs the process's subscriber: a console log layer with its own filter
//! (`AGORA_LOG`), and, when `[tracing]` (or `OTEL_*`) names an endpoint, an OpenTelemetry layer
//! that sees only Agora's own spans (so the exporter's own HTTP/2 spans are never exported).
//! The client side (`client_span`, `inject`) starts a span per command and writes its context
//! into the publish headers. The engine side (`command_span`, `Matching`, `PublishSpans`) turns
//! a sampled message's `traceparent` into a `agora.market.command` span with the match and the
//! publishes under it; the spans travel beside the batch (`TracedCommand`), never inside the
//! pure core.
//!
//! This module must never cost an untraced command anything but two checks: with tracing off,
//! one relaxed atomic load; with tracing on, a header lookup and a look at the sampled flag.
//! No span is created and no header is parsed before that.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::{HeaderMap, HeaderName};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler as SdkSampler, SdkTracerProvider};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::book::Seq;
use crate::bus::outputs::{Outcome, Outgoing};
pub mod settings;

use settings::{OtlpProtocol, Sampler, TracingConfig};

/// The W3C trace context header: `00-<trace id>-<parent span id>-<flags>`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Whether this process exports traces (set by `init`, cleared by `Tracing::shutdown`).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces. The engine's first check for every message.
#[inline]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The installed exporter, if any: `shutdown` flushes it before the process ends.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter. The blocking shutdown runs on a
    /// blocking thread, so the runtime it is awaited on (actix's single thread, which also
    /// drives the gRPC channel) keeps running meanwhile.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        EXPORTING.store(false, Ordering::Relaxed);
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("agora: the last spans were not exported: {e}"),
            Err(e) => eprintln!("agora: stopping the span exporter failed: {e}"),
        }
    }
}

/// Installs the process's subscriber: a console log layer on stderr when `console` names its
/// default filter (`AGORA_LOG` overrides it; the filter applies to the console only), and the
/// OpenTelemetry layer when `config` is active. Installs nothing when neither is wanted. Must
/// run inside the tokio runtime that will drive the gRPC channel (the node's actix system).
pub fn init(config: &TracingConfig, console: Option<&str>) -> Result<Tracing, String> {
    init_with(config, console, LogFormat::Text)
}

/// How the console log is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people; coloured only on a terminal, and never with `NO_COLOR` set.
    #[default]
    Text,
    /// One JSON object a line (timestamp, level, target, fields), for log shippers; the
    /// node's operator lines on standard output become JSON objects too.
    Json,
}

impl LogFormat {
    /// `text` or `json`.
    pub fn parse(name: &str) -> Option<LogFormat> {
        match name {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Whether the console log is JSON (see `LogFormat::Json`).
static LOG_JSON: AtomicBool = AtomicBool::new(false);

/// `t` as an RFC 3339 UTC time with microseconds (`2026-12-04T16:11:21.372121Z`), the form
/// the JSON log lines use.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Whether operator lines should be written as JSON objects.
pub fn log_json() -> bool {
    LOG_JSON.load(Ordering::Relaxed)
}

/// Whether console output may carry ANSI colours: only on a terminal, and not with `NO_COLOR`
/// set to anything non-empty (no-color.org).
pub fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `init` with the console log written as `format`.
pub fn init_with(
    config: &TracingConfig,
    console: Option<&str>,
    format: LogFormat,
) -> Result<Tracing, String> {
    use std::io::IsTerminal;
    let filter = |default: &str| {
        EnvFilter::try_from_env("AGORA_LOG").unwrap_or_else(|_| EnvFilter::new(default))
    };
    let json = format == LogFormat::Json;
    LOG_JSON.store(json && console.is_some(), Ordering::Relaxed);
    let text_layer = console.filter(|_| !json).map(|default| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(std::io::stderr().is_terminal()))
            .with_filter(filter(default))
    });
    let json_layer = console.filter(|_| json).map(|default| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter(default))
    });
    let console = text_layer.is_some() || json_layer.is_some();
    let provider = if config.active() {
        Some(provider(config)?)
    } else {
        None
    };
    if !console && provider.is_none() {
        return Ok(Tracing { provider: None });
    }
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("agora"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    // Agora's spans, and its warnings as span events; never the exporter's own
                    // (tonic, hyper, h2), which would feed back into the exporter.
                    meta.target().starts_with("agora")
                        && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
                })
                .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(text_layer)
        .with(json_layer)
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the log and trace subscriber: {e}"))?;
    if let Some(p) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(p.clone());
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(
            endpoint = %exporter_endpoint(config),
            protocol = ?config.protocol,
            service_name = %config.service_name,
            sampler = ?config.sampler,
            sampling_ratio = config.sampling_ratio,
            "exporting traces over OTLP"
        );
    }
    Ok(Tracing { provider })
}

/// Where the exporter sends: the endpoint as configured for gRPC; for HTTP, with `/v1/traces`
/// appended unless the path already ends with it (what the standard variable means).
pub fn exporter_endpoint(config: &TracingConfig) -> String {
    let endpoint = config.endpoint.trim_end_matches('/');
    match config.protocol {
        OtlpProtocol::Grpc => endpoint.to_string(),
        OtlpProtocol::Http if endpoint.ends_with("/v1/traces") => endpoint.to_string(),
        OtlpProtocol::Http => format!("{endpoint}/v1/traces"),
    }
}

fn sampler(config: &TracingConfig) -> SdkSampler {
    let ratio = || SdkSampler::TraceIdRatioBased(config.sampling_ratio);
    match config.sampler {
        Sampler::AlwaysOn => SdkSampler::AlwaysOn,
        Sampler::AlwaysOff => SdkSampler::AlwaysOff,
        Sampler::Traceidratio => ratio(),
        Sampler::ParentbasedAlwaysOn => SdkSampler::ParentBased(Box::new(SdkSampler::AlwaysOn)),
        Sampler::ParentbasedAlwaysOff => SdkSampler::ParentBased(Box::new(SdkSampler::AlwaysOff)),
        Sampler::ParentbasedTraceidratio => SdkSampler::ParentBased(Box::new(ratio())),
    }
}

fn provider(config: &TracingConfig) -> Result<SdkTracerProvider, String> {
    let endpoint = exporter_endpoint(config);
    let exporter = match config.protocol {
        OtlpProtocol::Grpc => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build(),
        OtlpProtocol::Http => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .build(),
    }
    .map_err(|e| format!("tracing.endpoint {endpoint}: cannot build the OTLP exporter: {e}"))?;
    // The batch processor exports from its own thread (OTEL_BSP_SCHEDULE_DELAY, 5 s by
    // default; OTEL_BSP_MAX_QUEUE_SIZE spans at most, the rest dropped, never blocking).
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(config))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The span of one command sent by a client: `agora.order.<op>`, with the market, the account
/// and the cid. Disabled (free) unless an OpenTelemetry layer listens.
pub fn client_span(op: &str, market: &str, account: &str, cid: Option<&str>) -> Span {
    let span = tracing::info_span!(
        "agora.order",
        otel.name = Empty,
        otel.kind = "producer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = "nats",
        market,
        account,
        cid = cid.unwrap_or(""),
        seq = Empty,
        oid = Empty,
    );
    if !span.is_disabled() {
        span.record("otel.name", format!("agora.order.{op}").as_str());
    }
    span
}

/// Writes `span`'s context into `headers` as `traceparent` (and `tracestate`): nothing when
/// the span is not exported.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// A counter or id as a span attribute: OpenTelemetry integers are signed (an unsigned field
/// would be exported as a string).
#[inline]
pub fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Records on a client's span what the stream answered.
pub fn record_sent(span: &Span, seq: Seq, oid: Option<u64>) {
    span.record("seq", int(seq));
    if let Some(oid) = oid {
        span.record("oid", int(oid));
    }
}

/// Marks `span` failed with `reason`.
pub fn fail(span: &Span, reason: &dyn std::fmt::Display) {
    if !span.is_disabled() {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", reason.to_string().as_str());
    }
}

/// Whether a `traceparent` value says "sampled": its flags are the last two hex digits, and
/// the sampled bit is the lowest. Looks at two bytes; the value is parsed only once sampled.
#[inline]
fn sampled(traceparent: &str) -> bool {
    let b = traceparent.as_bytes();
    b.len() >= 55
        && b[52] == b'-'
        && matches!(
            b[54],
            b'1' | b'3' | b'5' | b'7' | b'9' | b'b' | b'd' | b'f' | b'B' | b'D' | b'F'
        )
}

/// A traced stream message of a batch: its sequence and the span of its handling by the market.
#[derive(Clone, Debug)]
pub struct TracedCommand {
    pub seq: Seq,
    pub span: Span,
}

/// The span of a stream message's handling in `market` (`agora.market.command`, a child of the
/// client's span), when this process exports traces and the message's `traceparent` says
/// "sampled"; `None` otherwise, at the cost of an atomic load (and, with tracing on, a header
/// lookup).
#[inline]
pub fn command_span(market: &str, seq: Seq, headers: Option<&HeaderMap>) -> Option<TracedCommand> {
    if !exporting() {
        return None;
    }
    let headers = headers?;
    if !sampled(headers.get(TRACEPARENT)?.as_str()) {
        return None;
    }
    start_command_span(market, seq, headers)
}

#[cold]
#[inline(never)]
fn start_command_span(market: &str, seq: Seq, headers: &HeaderMap) -> Option<TracedCommand> {
    use opentelemetry::trace::TraceContextExt;
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if !parent.span().span_context().is_valid() {
        // A malformed header: no trace rather than a new one per command.
        return None;
    }
    let span = tracing::info_span!(
        "agora.market.command",
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = "nats",
        market,
        seq = int(seq),
    );
    // Fails only when no OpenTelemetry layer is installed: then nothing is exported anyway.
    let _ = span.set_parent(parent);
    Some(TracedCommand { seq, span })
}

/// The decode + match spans (`agora.match`) of a batch's traced messages: started before the
/// batch is applied, given their outcome and ended after. Empty, and free, for an untraced
/// batch. The batch is applied as one unit, so each span covers the whole batch's work.
pub struct Matching {
    spans: Vec<(Seq, Span)>,
}

impl Matching {
    #[inline]
    pub fn start(market: &str, traced: &[TracedCommand], batch_messages: usize) -> Matching {
        if traced.is_empty() {
            return Matching { spans: Vec::new() };
        }
        Matching::start_spans(market, traced, batch_messages)
    }

    #[cold]
    fn start_spans(market: &str, traced: &[TracedCommand], batch_messages: usize) -> Matching {
        let spans = traced
            .iter()
            .map(|t| {
                let span = tracing::info_span!(
                    parent: &t.span,
                    "agora.match",
                    market,
                    seq = int(t.seq),
                    batch_messages = int(batch_messages as u64),
                    oid = Empty,
                    cid = Empty,
                    account = Empty,
                    events = Empty,
                    fills = Empty,
                    rejected = Empty,
                );
                (t.seq, span)
            })
            .collect();
        Matching { spans }
    }

    /// The input sequences of the traced messages, for the core to say what each did.
    pub fn seqs(&self) -> Vec<Seq> {
        self.spans.iter().map(|(seq, _)| *seq).collect()
    }

    /// Records what each traced message did (`outcomes` in the order of `seqs()`, from the
    /// core) and ends the spans.
    #[inline]
    pub fn finish(self, outcomes: &[Outcome]) {
        if !self.spans.is_empty() {
            self.record(outcomes);
        }
    }

    #[cold]
    fn record(self, outcomes: &[Outcome]) {
        for ((_, span), o) in self.spans.iter().zip(outcomes) {
            if let Some(oid) = o.oid {
                span.record("oid", int(oid.0));
            }
            if let Some(cid) = &o.cid {
                span.record("cid", cid.as_str());
            }
            if let Some(account) = &o.account {
                span.record("account", account.as_str());
            }
            span.record("events", int(o.events));
            span.record("fills", int(o.fills));
            if let Some(reason) = o.rejected {
                span.record("rejected", reason.as_str());
            }
        }
    }
}

/// The spans of one publish (`agora.journal.publish` or `agora.reports.publish`), one under
/// each traced message's span: a batch's publish serves every message in it. Ended on drop.
pub struct PublishSpans(Vec<Span>);

impl PublishSpans {
    /// The batch's journal message.
    #[inline]
    pub fn journal(traced: &[TracedCommand], journal: &Outgoing) -> PublishSpans {
        if traced.is_empty() {
            return PublishSpans(Vec::new());
        }
        PublishSpans(
            traced
                .iter()
                .map(|t| {
                    tracing::info_span!(
                        parent: &t.span,
                        "agora.journal.publish",
                        otel.kind = "producer",
                        otel.status_code = Empty,
                        otel.status_description = Empty,
                        messaging.system = "nats",
                        messaging.destination.name = journal.subject.as_str(),
                        messaging.message.id = journal.msg_id.as_deref().unwrap_or(""),
                    )
                })
                .collect(),
        )
    }

    /// The batch's execution reports and trade tape (`messages` JetStream publishes).
    #[inline]
    pub fn reports(traced: &[TracedCommand], messages: usize) -> PublishSpans {
        if traced.is_empty() {
            return PublishSpans(Vec::new());
        }
        PublishSpans(
            traced
                .iter()
                .map(|t| {
                    tracing::info_span!(
                        parent: &t.span,
                        "agora.reports.publish",
                        otel.kind = "producer",
                        otel.status_code = Empty,
                        otel.status_description = Empty,
                        messaging.system = "nats",
                        messages = int(messages as u64),
                    )
                })
                .collect(),
        )
    }

    /// Marks the publish (and the commands it served) failed.
    pub fn fail(&self, traced: &[TracedCommand], reason: &dyn std::fmt::Display) {
        for span in self.0.iter().chain(traced.iter().map(|t| &t.span)) {
            fail(span, reason);
        }
    }
}

/// Records what a recovery did on its span (the current one, inside `recover`).
pub fn record_recovered(
    span: &Span,
    snapshot_seq: Option<Seq>,
    replayed: u64,
    republished: u64,
    last_seq: Seq,
) {
    if let Some(seq) = snapshot_seq {
        span.record("snapshot_seq", int(seq));
    }
    span.record("replayed", int(replayed));
    span.record("republished", int(republished));
    span.record("last_seq", int(last_seq));
}

/// The span of a market's recovery (`agora.market.recover`): a child of the handoff or
/// failover that gave the market to this node when `parent` (a `traceparent`) says so, else a
/// trace of its own, kept as the node's sampler says. Disabled when this process does not
/// export traces.
pub fn recover_span(market: &str, node: &str, parent: Option<&str>) -> Span {
    if !exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "agora.market.recover",
        market,
        node,
        warm = Empty,
        epoch = Empty,
        snapshot_seq = Empty,
        replayed = Empty,
        republished = Empty,
        last_seq = Empty,
    );
    if let Some(parent) = parent {
        set_parent(&span, parent);
    }
    span
}

/// Makes `span` a child of the context a `traceparent` value carries (nothing if malformed).
pub fn set_parent(span: &Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt;
    if span.is_disabled() {
        return;
    }
    let mut headers = HeaderMap::new();
    headers.insert(TRACEPARENT, traceparent);
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// `span`'s context as a `traceparent` value, to carry where headers cannot go (a placement
/// record); `None` when the span is not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(span, &mut headers);
    headers.get(TRACEPARENT).map(|v| v.as_str().to_string())
}

/// The `traceparent` of a NATS message, if it has one.
pub fn traceparent_of(headers: Option<&HeaderMap>) -> Option<String> {
    headers?.get(TRACEPARENT).map(|v| v.as_str().to_string())
}

/// The span of a planned move of a market (`agora.market.handoff`), started by whoever moves it;
/// its context travels to both nodes (request headers, then the placement record), so the
/// release on the source and the recovery on the target are its children.
pub fn handoff_span(market: &str, to: &str) -> Span {
    if !exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "agora.market.handoff",
        otel.status_code = Empty,
        otel.status_description = Empty,
        market,
        to,
        from = Empty,
        epoch = Empty,
        lag = Empty,
        pause_us = Empty,
    )
}

/// The span of a failover decided by the rebalancer (`agora.market.failover`); the new owner's
/// recovery is its child (through the placement record).
pub fn failover_span(market: &str, from: &str, to: &str, epoch: u64) -> Span {
    if !exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "agora.market.failover",
        market,
        from,
        to,
        epoch = int(epoch),
    )
}

/// A node's part of a handoff (`agora.node.follow`, `agora.node.release`), a child of the
/// request's `traceparent`; none without one.
pub fn node_span(verb: &str, market: &str, node: &str, parent: Option<&str>) -> Span {
    let Some(parent) = parent.filter(|_| exporting()) else {
        return Span::none();
    };
    let span = tracing::info_span!(
        "agora.node",
        otel.name = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
        market,
        node,
        seq = Empty,
        lag = Empty,
    );
    span.record("otel.name", format!("agora.node.{verb}").as_str());
    set_parent(&span, parent);
    span
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_written_as_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_796_400_681_372_121);
        assert_eq!(super::rfc3339(t), "2026-12-04T16:11:21.372121Z");
        assert_eq!(
            super::rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(super::rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    use super::*;

    #[test]
    fn the_sampled_flag_is_read_from_the_last_hex_digit() {
        let tp =
            |flags: &str| format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}");
        assert!(sampled(&tp("01")));
        assert!(sampled(&tp("03")));
        assert!(!sampled(&tp("00")));
        assert!(!sampled(&tp("02")));
        assert!(!sampled("00-short-01"));
        assert!(!sampled(""));
    }

    #[test]
    fn untraced_messages_cost_no_span() {
        // Tracing is off in unit tests: nothing is looked at.
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        assert!(command_span("BTC-USDC", 1, Some(&headers)).is_none());
        assert!(Matching::start("BTC-USDC", &[], 3).spans.is_empty());
        let journal = Outgoing {
            subject: "agora.events.BTC-USDC".into(),
            msg_id: Some("BTC-USDC:3".into()),
            payload: Default::default(),
        };
        assert!(PublishSpans::journal(&[], &journal).0.is_empty());
    }

    #[test]
    fn the_http_endpoint_gets_the_traces_path_once() {
        let config = |endpoint: &str, protocol| TracingConfig {
            endpoint: endpoint.into(),
            protocol,
            ..TracingConfig::default()
        };
        let http = OtlpProtocol::Http;
        assert_eq!(
            exporter_endpoint(&config("http://j:4318", http)),
            "http://j:4318/v1/traces"
        );
        assert_eq!(
            exporter_endpoint(&config("http://j:4318/v1/traces", http)),
            "http://j:4318/v1/traces"
        );
        assert_eq!(
            exporter_endpoint(&config("http://j:4317/", OtlpProtocol::Grpc)),
            "http://j:4317"
        );
    }

    #[test]
    fn an_outcome_names_the_order_and_counts_its_fills() {
        use crate::actors::{Incoming, MarketCore};
        use crate::book::MarketSpecInput;
        let spec = MarketSpecInput::new("BTC-USDC", 2, 0)
            .validate()
            .expect("spec");
        let mut core = MarketCore::new(crate::bus::Subjects::default(), spec, 100);
        let message = |seq: Seq, json: &str| Incoming {
            seq,
            ts: seq,
            payload: json.as_bytes().to_vec(),
            json: true,
            operator: false,
            account: None,
        };
        let traced = [3, 4, 9];
        let mut outcomes = [Outcome::default(); 3];
        let out = core.process_traced(
            &[
                message(1, r#"{"op":"new","account":"bob","cid":"b1","side":"sell","price":"10.00","qty":"3"}"#),
                message(2, r#"{"op":"new","account":"bob","cid":"b2","side":"sell","price":"10.00","qty":"3"}"#),
                message(3, r#"{"op":"new","account":"alice","cid":"a1","side":"buy","price":"10.00","qty":"5"}"#),
                message(4, r#"{"op":"new","account":"alice","side":"up","qty":"5"}"#),
            ],
            &traced,
            &mut outcomes,
        );
        assert_eq!(out.len(), 1);
        let o = &outcomes[0];
        assert_eq!(o.oid.map(|oid| oid.0), Some(3000));
        assert_eq!(o.cid.as_ref().map(|c| c.as_str()), Some("a1"));
        assert_eq!(o.account.as_ref().map(|a| a.as_str()), Some("alice"));
        assert_eq!((o.events, o.fills, o.rejected), (3, 2, None));
        let o = &outcomes[1];
        assert_eq!(o.account.as_ref().map(|a| a.as_str()), Some("alice"));
        assert_eq!(o.rejected.map(|r| r.as_str()), Some("invalid_field"));
        assert_eq!(outcomes[2], Outcome::default());
    }
}
