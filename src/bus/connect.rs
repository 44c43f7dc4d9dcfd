//! Connecting to NATS: the server list, how to authenticate (credentials file, nkey seed,
//! user and password, or token), TLS, and reconnecting with back-off.
//!
//! The same `NatsOptions` serve the node (the `[nats]` section of its configuration) and the
//! shell commands (`agora ctl`, `order`, `watch`, flags or the same `AGORA_NATS__*`
//! variables). A failure says which server was tried, what it answered, and what to change.
//! This module must never log or echo a secret: a URL's user info (`nats://user:pass@host`,
//! which is honoured as the login) is shown only through `redact`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ServerAddr};
use serde::{Deserialize, Serialize};

use super::error::BusError;

/// How to reach and authenticate to NATS. At most one way to authenticate may be set.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsOptions {
    /// A `.creds` file (JWT and nkey seed, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey user seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for the server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub tls_required: bool,
    /// Longest wait between two reconnect attempts; they start at 100 ms and double.
    pub reconnect_delay_max_ms: Option<u64>,
    /// Where replies to this connection's requests go: `<inbox_prefix>.<random>`. Unset, it
    /// is `_INBOX_<user>` for a user/password login (so NATS permissions can give each user
    /// its own inbox, `_INBOX_<user>.>`, and nobody else's replies) and `_INBOX` otherwise.
    pub inbox_prefix: Option<String>,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<set>");
        f.debug_struct("NatsOptions")
            .field("creds_file", &self.creds_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .field("reconnect_delay_max_ms", &self.reconnect_delay_max_ms)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

/// Set when the process is shutting down on purpose: connections it closes then are not lost.
static CLOSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that this process is stopping: connections closing from now on are logged as such,
/// not warned about as lost.
pub fn closing() {
    CLOSING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Default longest wait between reconnect attempts.
pub const RECONNECT_DELAY_MAX_DEFAULT: Duration = Duration::from_secs(2);

fn set(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|s| !s.is_empty())
}

fn set_path(p: &Option<PathBuf>) -> bool {
    p.as_deref().is_some_and(|p| !p.as_os_str().is_empty())
}

/// Whether `prefix` can stand before `.<random>` as an inbox: tokens of letters, digits, '-'
/// and '_' separated by dots.
fn valid_inbox_prefix(prefix: &str) -> bool {
    prefix.split('.').all(|t| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

impl NatsOptions {
    /// Checks the options before any connection: one way to authenticate, complete pairs,
    /// files that exist. The error names the key (as in the `[nats]` section) and the fix.
    pub fn check(&self) -> Result<(), String> {
        let ways: Vec<&str> = [
            (set_path(&self.creds_file), "creds_file"),
            (set_path(&self.nkey_seed_file), "nkey_seed_file"),
            (set(&self.user) || set(&self.password), "user/password"),
            (set(&self.token), "token"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if ways.len() > 1 {
            return Err(format!(
                "nats: {} are all set; use one way to authenticate",
                ways.join(", ")
            ));
        }
        if set(&self.user) != set(&self.password) {
            return Err(
                "nats: user and password go together; set both (or use a token, nkey or creds file)"
                    .into(),
            );
        }
        if set_path(&self.tls_cert_file) != set_path(&self.tls_key_file) {
            return Err("nats: tls_cert_file and tls_key_file go together; set both".into());
        }
        for (key, path) in [
            ("creds_file", &self.creds_file),
            ("nkey_seed_file", &self.nkey_seed_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = path.as_deref().filter(|p| !p.as_os_str().is_empty())
                && !p.is_file()
            {
                return Err(format!("nats.{key}: {} does not exist", p.display()));
            }
        }
        if let Some(ms) = self.reconnect_delay_max_ms
            && !(100..=60_000).contains(&ms)
        {
            return Err(format!(
                "nats.reconnect_delay_max_ms = {ms}: use 100 to 60000"
            ));
        }
        if let Some(prefix) = self.inbox_prefix.as_deref().filter(|p| !p.is_empty())
            && !valid_inbox_prefix(prefix)
        {
            return Err(format!(
                "nats.inbox_prefix = {prefix:?}: use tokens of letters, digits, '-' and '_' separated by dots, such as \"_INBOX_alice\""
            ));
        }
        Ok(())
    }

    /// The inbox prefix this connection uses (see `inbox_prefix`).
    pub fn inbox(&self) -> String {
        match (self.inbox_prefix.as_deref(), self.user.as_deref()) {
            (Some(prefix), _) if !prefix.is_empty() => prefix.to_string(),
            (_, Some(user)) if valid_inbox_prefix(user) => format!("_INBOX_{user}"),
            _ => "_INBOX".to_string(),
        }
    }

    /// Whether a way to authenticate is set.
    fn has_login(&self) -> bool {
        set_path(&self.creds_file)
            || set_path(&self.nkey_seed_file)
            || set(&self.user)
            || set(&self.password)
            || set(&self.token)
    }

    fn uses_tls(&self) -> bool {
        self.tls_required || set_path(&self.tls_ca_file) || set_path(&self.tls_cert_file)
    }
}

/// A NATS URL (or comma-separated list) with any user info replaced by `***`, fit to print:
/// `nats://agora-node:s3cret@h:4222` shows as `nats://***@h:4222`. Works on text that does
/// not parse, too, since that is exactly what an error message may need to show.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|part| {
            let start = part.find("://").map_or(0, |i| i + 3);
            match part.rfind('@') {
                Some(at) if at >= start => format!("{}***{}", &part[..start], &part[at..]),
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The login a URL carries in its user info: `user:password@` or, as NATS clients read it,
/// a lone `token@`.
#[derive(Clone, PartialEq, Eq)]
enum UrlLogin {
    UserPassword(String, String),
    Token(String),
}

/// The servers of a URL list, without their user info, and the login the URLs carry.
struct Servers {
    addrs: Vec<ServerAddr>,
    login: Option<UrlLogin>,
}

/// `%XX` escapes of a URL's user info, decoded (`p%40ss` is `p@ss`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `urls`: one or more server URLs, comma-separated, spaces around them allowed
/// (`nats://a:4222, nats://b:4222`); a missing scheme means `nats://`, a missing port 4222.
/// User info is taken out of each address and returned as the login; every URL that has one
/// must have the same. Errors name the entry and say what to write; they never show a secret.
fn parse_servers(urls: &str) -> Result<Servers, String> {
    let mut addrs = Vec::new();
    let mut login: Option<UrlLogin> = None;
    for (n, part) in urls.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            if urls.trim().is_empty() {
                return Err("no NATS URL was given; pass --nats-url nats://host:4222".into());
            }
            return Err(format!(
                "entry {} of the server list is empty; separate URLs with single commas",
                n + 1
            ));
        }
        let addr: ServerAddr = part.parse().map_err(|e: std::io::Error| {
            format!(
                "{} is not a NATS URL ({}); write nats://host:port (tls://host:port for TLS), comma-separated for several",
                redact(part),
                redact(&e.to_string())
            )
        })?;
        let mut url = addr.into_inner();
        let found = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(UrlLogin::UserPassword(
                percent_decode(user),
                percent_decode(password),
            )),
            (token, None) => Some(UrlLogin::Token(percent_decode(token))),
        };
        if let Some(found) = found {
            match &login {
                Some(l) if *l != found => {
                    return Err(format!(
                        "the URLs of the server list carry different logins ({} and {}); give every URL the same, or none and use the [nats] settings",
                        redact(urls.split(',').next().unwrap_or("").trim()),
                        redact(part)
                    ));
                }
                _ => login = Some(found),
            }
            // Only the login is taken out; these cannot fail on a URL that has a host.
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        addrs.push(ServerAddr::from_url(url).map_err(|e| format!("{}: {e}", redact(part)))?);
    }
    Ok(Servers { addrs, login })
}

fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// The wait before connection attempt `attempts` (counted from 1, for the first connection
/// and again after each loss): none before the first, then 100 ms doubling up to `max`. The
/// client asks before every attempt, the first included: waiting there cost every new
/// connection (an arbiter's first market, so every failover to a node running nothing yet)
/// 100 ms.
pub fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    (Duration::from_millis(100) * 2u32.pow(doublings)).min(max)
}

/// Connects to `url` (one or more, comma-separated, spaces allowed) as `name` with
/// `options`, failing at once with a message naming the address (its user info redacted) and
/// the fix when nothing answers or the server refuses. A login in the URL
/// (`nats://user:password@host`, or `nats://token@host`) is used like the `[nats]` settings;
/// setting both is refused.
pub async fn connect_with(
    url: &str,
    name: &str,
    options: &NatsOptions,
) -> Result<async_nats::Client, BusError> {
    let fail = |reason: String, retry: bool| BusError::Connect {
        url: redact(url),
        reason,
        retry,
    };
    let servers = parse_servers(url).map_err(|e| fail(format!("{e} (nothing was sent)"), false))?;
    let mut options = options.clone();
    match servers.login {
        Some(_) if options.has_login() => {
            return Err(fail(
                "the URL carries a login and the [nats] settings (or --user, --password, --token, --creds, --nkey) set one too; use one of them (nothing was sent)".into(),
                false,
            ));
        }
        Some(UrlLogin::UserPassword(user, password)) => {
            options.user = Some(user);
            options.password = Some(password);
        }
        Some(UrlLogin::Token(token)) => options.token = Some(token),
        None => {}
    }
    options
        .check()
        .map_err(|e| fail(format!("{e} (nothing was sent)"), false))?;
    let max = options
        .reconnect_delay_max_ms
        .map_or(RECONNECT_DELAY_MAX_DEFAULT, Duration::from_millis);
    let who = name.to_string();
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(options.inbox())
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max))
        .event_callback(move |event| {
            let who = who.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected
                        if CLOSING.load(std::sync::atomic::Ordering::Relaxed) =>
                    {
                        tracing::debug!(client = %who, "NATS connection closed")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(client = %who, "NATS connection lost; reconnecting")
                    }
                    async_nats::Event::Connected => {
                        tracing::debug!(client = %who, "NATS connection (re)established")
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(client = %who, "NATS server error: {e}")
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(client = %who, sid, "NATS slow consumer: messages dropped on a subscription")
                    }
                    other => tracing::debug!(client = %who, "NATS event: {other}"),
                }
            }
        });
    if let Some(path) = options
        .creds_file
        .as_deref()
        .filter(|_| set_path(&options.creds_file))
    {
        opts = opts.credentials_file(path).await.map_err(|e| {
            fail(
                format!("cannot use credentials file {}: {e}", path.display()),
                false,
            )
        })?;
    }
    if let Some(path) = options
        .nkey_seed_file
        .as_deref()
        .filter(|_| set_path(&options.nkey_seed_file))
    {
        opts = opts.nkey(read_secret(path, "nkey seed file").map_err(|e| fail(e, false))?);
    }
    if let (Some(user), Some(password)) = (&options.user, &options.password)
        && !user.is_empty()
    {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = options.token.as_ref().filter(|t| !t.is_empty()) {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = options
        .tls_ca_file
        .as_ref()
        .filter(|_| set_path(&options.tls_ca_file))
    {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&options.tls_cert_file, &options.tls_key_file)
        && set_path(&options.tls_cert_file)
    {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if options.uses_tls() {
        opts = opts.require_tls(true);
    }
    opts.connect(servers.addrs).await.map_err(|e| {
        let text = redact(&e.to_string());
        let tls_failed = text.contains("certificate") || text.to_lowercase().contains("tls");
        let (hint, retry) = match e.kind() {
            _ if tls_failed => (
                "TLS failed; check nats.tls_ca_file / --tls-ca (the CA that signed the server's certificate), the client certificate and key, and that the server has TLS on",
                false,
            ),
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => (
                "the server refused the credentials; check the URL's user:password, nats.user/password, token, nkey_seed_file or creds_file (--user, --password, --token, --creds)",
                false,
            ),
            ConnectErrorKind::Tls => (
                "TLS failed; check nats.tls_ca_file / --tls-ca, the client certificate and key, and that the server has TLS on",
                false,
            ),
            ConnectErrorKind::ServerParse => (
                "the URL does not parse; use nats://host:port (tls://host:port for TLS), comma-separated for several",
                false,
            ),
            _ => ("start nats-server or pass --nats-url", true),
        };
        fail(format!("{text}; {hint}"), retry)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_way_to_authenticate_and_complete_pairs() {
        assert!(NatsOptions::default().check().is_ok());
        let both = NatsOptions {
            token: Some("t".into()),
            user: Some("u".into()),
            password: Some("p".into()),
            ..NatsOptions::default()
        };
        let e = both.check().expect_err("two ways");
        assert!(e.contains("user/password, token"), "{e}");
        let half = NatsOptions {
            user: Some("u".into()),
            ..NatsOptions::default()
        };
        assert!(
            half.check()
                .expect_err("no password")
                .contains("go together")
        );
        let missing = NatsOptions {
            creds_file: Some("/nonexistent/x.creds".into()),
            ..NatsOptions::default()
        };
        let e = missing.check().expect_err("missing file");
        assert!(
            e.contains("nats.creds_file") && e.contains("does not exist"),
            "{e}"
        );
        let slow = NatsOptions {
            reconnect_delay_max_ms: Some(5),
            ..NatsOptions::default()
        };
        assert!(slow.check().is_err());
        // Empty strings (an unset environment variable) count as unset.
        let empty = NatsOptions {
            token: Some(String::new()),
            user: Some(String::new()),
            password: Some(String::new()),
            ..NatsOptions::default()
        };
        assert!(empty.check().is_ok());
    }

    #[test]
    fn a_user_login_gets_its_own_inbox() {
        let alice = NatsOptions {
            user: Some("alice".into()),
            password: Some("x".into()),
            ..NatsOptions::default()
        };
        assert_eq!(alice.inbox(), "_INBOX_alice");
        assert_eq!(NatsOptions::default().inbox(), "_INBOX");
        let chosen = NatsOptions {
            inbox_prefix: Some("_INBOX_desk1".into()),
            ..alice.clone()
        };
        assert_eq!(chosen.inbox(), "_INBOX_desk1");
        let odd = NatsOptions {
            user: Some("a b".into()),
            ..NatsOptions::default()
        };
        assert_eq!(
            odd.inbox(),
            "_INBOX",
            "a user name that cannot stand in a subject"
        );
        let bad = NatsOptions {
            inbox_prefix: Some("_INBOX.>".into()),
            ..NatsOptions::default()
        };
        assert!(
            bad.check()
                .expect_err("a wildcard")
                .contains("inbox_prefix")
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let o = NatsOptions {
            user: Some("alice".into()),
            password: Some("hunter2".into()),
            ..NatsOptions::default()
        };
        let shown = format!("{o:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn a_server_list_parses_with_and_without_spaces() {
        for list in [
            "nats://127.0.0.1:16225,nats://127.0.0.1:16226,nats://127.0.0.1:16227",
            "nats://127.0.0.1:16225, nats://127.0.0.1:16226 ,  nats://127.0.0.1:16227",
            "127.0.0.1:16225,127.0.0.1:16226,127.0.0.1:16227",
        ] {
            let servers = parse_servers(list).unwrap_or_else(|e| panic!("{list}: {e}"));
            let ports: Vec<u16> = servers.addrs.iter().map(ServerAddr::port).collect();
            assert_eq!(ports, [16225, 16226, 16227], "{list}");
            assert!(servers.login.is_none());
        }
        let e = parse_servers("nats://a:1,,nats://b:2")
            .err()
            .expect("empty entry");
        assert!(e.contains("entry 2") && e.contains("empty"), "{e}");
        let e = parse_servers("nats://u:pw@a:99999")
            .err()
            .expect("bad port");
        assert!(e.contains("not a NATS URL") && !e.contains("pw"), "{e}");
        assert!(parse_servers("  ").is_err());
    }

    #[test]
    fn a_login_in_the_urls_is_taken_out_and_used() {
        let servers = parse_servers(
            "nats://agora-node:p%40ss@127.0.0.1:1, nats://agora-node:p%40ss@127.0.0.1:2",
        )
        .expect("parses");
        assert!(servers.login == Some(UrlLogin::UserPassword("agora-node".into(), "p@ss".into())));
        for addr in &servers.addrs {
            assert!(
                !addr.as_url_str().contains("p%40ss"),
                "{}",
                addr.as_url_str()
            );
            assert!(!addr.has_user_pass());
        }
        let token = parse_servers("nats://s3cret@127.0.0.1:1").expect("parses");
        assert!(token.login == Some(UrlLogin::Token("s3cret".into())));
        let e = parse_servers("nats://a:x@h:1,nats://a:y@h:2")
            .err()
            .expect("two logins");
        assert!(
            e.contains("different logins") && !e.contains(":x@") && !e.contains(":y@"),
            "{e}"
        );
    }

    #[test]
    fn urls_are_shown_without_their_user_info() {
        assert_eq!(
            redact("nats://agora-node:hunter2@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(
            redact("nats://u:p@a:1, tls://t@b:2,nats://c:3"),
            "nats://***@a:1, tls://***@b:2,nats://c:3"
        );
        assert_eq!(redact("u:p@a:1"), "***@a:1");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn reconnects_back_off_to_the_maximum() {
        let max = Duration::from_secs(2);
        let waits: Vec<u64> = (0..=8)
            .map(|a| reconnect_delay(a, max).as_millis() as u64)
            .collect();
        assert_eq!(waits, [0, 0, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }
}
