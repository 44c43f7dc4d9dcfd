//! The page's files, compiled in from `web/` (plain ES modules and CSS: no build step).

/// One served file.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $type:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $file)),
        }
    };
}

pub static ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/assets/style.css", "style.css", "text/css; charset=utf-8"),
    asset!("/assets/app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!(
        "/assets/book.js",
        "book.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/assets/candles.js",
        "candles.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/assets/chart.js",
        "chart.js",
        "text/javascript; charset=utf-8"
    ),
];

/// The file served at `path` (`/index.html` is `/`).
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|a| a.path == path)
}
