//! `presencectl web`: serves the browser example (`examples/web`, with its `node_modules`) and
//! the wire schema at [`PROTO_PATH`] over plain HTTP, for development on loopback. It owns the
//! mapping of a request path to a file: GET and HEAD only, percent-escapes decoded first, then
//! every segment must be a plain name (no `.`/`..`, no dotfiles, no backslashes or NULs), and the
//! file's real path (symlinks resolved) must stay inside the folder. No directory listings; a
//! folder serves its `index.html`. Content types come from a short extension table.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// Where the page loads the schema from.
pub(crate) const PROTO_PATH: &str = "/presence.proto";
/// The protobufjs build the page loads; its absence means `npm install` has not run.
const PROTOBUFJS: &str = "node_modules/protobufjs/dist/protobuf.min.js";

/// The folder and schema being served, both canonical.
#[derive(Debug)]
pub(crate) struct Site {
    root: PathBuf,
    proto: PathBuf,
}

impl Site {
    /// Checks the folder (index.html and protobufjs present) and the schema file.
    pub(crate) fn open(dir: &Path, proto: &Path) -> anyhow::Result<Site> {
        let root = dir.canonicalize().with_context(|| {
            format!(
                "cannot open the example folder {}: run presencectl from the repository root \
                 (or pass --dir), after `npm install --prefix examples/web`",
                dir.display()
            )
        })?;
        if !root.join("index.html").is_file() {
            bail!(
                "{} has no index.html: pass --dir examples/web",
                root.display()
            );
        }
        if !root.join(PROTOBUFJS).is_file() {
            bail!(
                "{} is missing: install the page's dependencies first with \
                 `npm install --prefix {}`",
                root.join(PROTOBUFJS).display(),
                dir.display()
            );
        }
        let proto = proto.canonicalize().with_context(|| {
            format!(
                "cannot open the schema {}: run presencectl from the repository root (or pass \
                 --proto)",
                proto.display()
            )
        })?;
        if !proto.is_file() {
            bail!("{} is not a file", proto.display());
        }
        Ok(Site { root, proto })
    }

    /// The file a request path names, or `None` (answered 404).
    pub(crate) fn resolve(&self, path: &str) -> Option<PathBuf> {
        if path == PROTO_PATH {
            return Some(self.proto.clone());
        }
        let decoded = percent_decode(path)?;
        let relative = decoded.strip_prefix('/')?;
        let segments: Vec<&str> = relative.split('/').collect();
        let mut file = self.root.clone();
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() {
                // Only a trailing slash ("/" or "/folder/") may leave a segment empty.
                if i + 1 == segments.len() {
                    break;
                }
                return None;
            }
            if !plain_name(segment) {
                return None;
            }
            file.push(segment);
        }
        if file.is_dir() {
            file.push("index.html");
        }
        let real = file.canonicalize().ok()?;
        (real.starts_with(&self.root) && real.is_file()).then_some(real)
    }
}

/// A file or folder name that cannot climb out or name something hidden.
fn plain_name(segment: &str) -> bool {
    let mut components = Path::new(segment).components();
    matches!(components.next(), Some(Component::Normal(_)))
        && components.next().is_none()
        && !segment.starts_with('.')
        && !segment.contains(['\\', '\0', ':'])
}

/// `%XX` escapes decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Content-Type for a file, by extension.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "proto" | "txt" | "md" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// Answers one request.
async fn respond(site: Arc<Site>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        eprintln!(
            "presencectl: {method} {} refused (GET and HEAD only)",
            uri.path()
        );
        let mut response = (StatusCode::METHOD_NOT_ALLOWED, "GET and HEAD only\n").into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let path = uri.path().to_string();
    let found = tokio::task::spawn_blocking(move || {
        let file = site.resolve(&path)?;
        std::fs::read(&file).ok().map(|bytes| (file, bytes))
    })
    .await
    .ok()
    .flatten();
    let Some((file, bytes)) = found else {
        eprintln!("presencectl: {method} {} not found", uri.path());
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let headers = [
        (header::CONTENT_TYPE, content_type(&file)),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    // axum leaves the body out of HEAD answers and keeps Content-Length.
    (headers, bytes).into_response()
}

/// Serves `site` on `addr` until Ctrl-C. Prints exactly one line on stdout,
/// `serving http://ADDR/`, once the socket listens; hints go to stderr.
pub(crate) async fn serve(addr: SocketAddr, site: Site) -> anyhow::Result<()> {
    let site = Arc::new(site);
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let site = site.clone();
        async move { respond(site, method, uri).await }
    });
    let socket = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = socket.local_addr()?;
    println!("serving http://{local}/");
    if !local.ip().is_loopback() {
        eprintln!(
            "presencectl: warning: {local} is not a loopback address; anyone who reaches it can \
             load the example"
        );
    }
    eprintln!(
        "presencectl: open http://{local}/ and connect to the broker's WebSocket, \
         wss://127.0.0.1:7885/v1/ws for `presenced --ws-listen 127.0.0.1:7885` (the browser must \
         trust certs-dev/ca.pem), or ws://127.0.0.1:PORT/v1/ws for `--ws-plain-listen`; get a \
         token with `presencectl token --user alice`. The page also reads \
         #ws=URL&token=TOKEN&watch=bob&room=lobby from its address."
    );
    axum::serve(socket, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, Site) {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("web");
        std::fs::create_dir_all(root.join("node_modules/protobufjs/dist")).unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("index.html"), "<p>hi</p>").unwrap();
        std::fs::write(root.join("sub/index.html"), "sub").unwrap();
        std::fs::write(root.join("app.js"), "1").unwrap();
        std::fs::write(root.join(".secret"), "no").unwrap();
        std::fs::write(root.join(PROTOBUFJS), "pb").unwrap();
        std::fs::write(top.path().join("outside.txt"), "no").unwrap();
        std::fs::write(top.path().join("p.proto"), "syntax").unwrap();
        std::os::unix::fs::symlink(top.path().join("outside.txt"), root.join("out.txt")).unwrap();
        std::os::unix::fs::symlink(top.path(), root.join("up")).unwrap();
        std::os::unix::fs::symlink(root.join("app.js"), root.join("in.js")).unwrap();
        let site = Site::open(&root, &top.path().join("p.proto")).unwrap();
        (top, site)
    }

    #[test]
    fn paths_stay_inside_the_folder() {
        let (_top, site) = site();
        let name = |p: &str| {
            site.resolve(p)
                .map(|f| f.strip_prefix(&site.root).unwrap().display().to_string())
        };
        assert_eq!(name("/").as_deref(), Some("index.html"));
        assert_eq!(name("/index.html").as_deref(), Some("index.html"));
        assert_eq!(name("/sub/").as_deref(), Some("sub/index.html"));
        assert_eq!(name("/sub").as_deref(), Some("sub/index.html"));
        assert_eq!(name("/app%2Ejs").as_deref(), Some("app.js"));
        assert_eq!(
            name("/in.js").as_deref(),
            Some("app.js"),
            "a symlink inside"
        );
        assert_eq!(
            name("/node_modules/protobufjs/dist/protobuf.min.js").as_deref(),
            Some(PROTOBUFJS)
        );
        assert_eq!(site.resolve(PROTO_PATH), Some(site.proto.clone()));
        for bad in [
            "/../outside.txt",
            "/sub/../../outside.txt",
            "/%2e%2e/outside.txt",
            "/sub%2F..%2F..%2Foutside.txt",
            "/..%5Coutside.txt",
            "//etc/passwd",
            "/sub//index.html",
            "/./index.html",
            "/.secret",
            "/out.txt",
            "/up/outside.txt",
            "/empty/",
            "/missing.js",
            "/%zz",
            "/%ff",
            "/a%00b",
            "relative",
        ] {
            assert_eq!(site.resolve(bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(
            content_type(Path::new("a/index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("protobuf.min.JS")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("presence.proto")),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x")), "application/octet-stream");
    }

    #[test]
    fn a_folder_without_protobufjs_says_to_run_npm_install() {
        let top = tempfile::tempdir().unwrap();
        std::fs::write(top.path().join("index.html"), "").unwrap();
        std::fs::write(top.path().join("p.proto"), "").unwrap();
        let e = Site::open(top.path(), &top.path().join("p.proto")).unwrap_err();
        assert!(format!("{e:#}").contains("npm install --prefix"), "{e:#}");
        let e = Site::open(&top.path().join("nope"), &top.path().join("p.proto")).unwrap_err();
        assert!(format!("{e:#}").contains("npm install --prefix"), "{e:#}");
    }
}
