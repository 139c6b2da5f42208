//! `authswap healthcheck`: GET the admin listener's `/healthz`, so a
//! container HEALTHCHECK needs neither a shell nor curl. `https://` URLs
//! (and the default URL when the admin listener serves TLS) are probed
//! over TLS, the certificate verified against the built-in roots and
//! `tls.extra_ca_file`.

use anyhow::{bail, Context};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn run(path: &Path, args: super::HealthcheckArgs) -> anyhow::Result<()> {
    let (url, config) = match args.url {
        Some(u) => (u, None),
        None => {
            let config = super::load_config(path)?;
            let mut addr = crate::config::parse_listen("admin.listen", &config.admin.listen)?;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if config.admin.tls_cert_file.is_some() {
                "https"
            } else {
                "http"
            };
            (format!("{scheme}://{addr}/healthz"), Some(config))
        }
    };
    let uri: http::Uri = url.parse().context("--url")?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("--url {url}: only http:// and https:// URLs can be probed"),
    };
    let host = uri.host().context("--url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let connector = if tls {
        // The trust `serve` uses for its own outbound TLS.
        let config = match config {
            Some(c) => c,
            None => super::load_config(path)
                .context("an https:// probe needs the configuration for tls.extra_ca_file")?,
        };
        let mut client = crate::tls::client_config(&config.tls)?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsConnector::from(Arc::new(client)))
    } else {
        None
    };
    let name = host.trim_matches(['[', ']']).to_owned();
    let probe = async {
        let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
        let io: crate::proxy::line::BoxIo = match &connector {
            None => Box::new(stream),
            Some(c) => {
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())?;
                Box::new(
                    c.connect(server_name, stream)
                        .await
                        .context("TLS handshake (is the certificate trusted? tls.extra_ca_file)")?,
                )
            }
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(uri.path())
            .header(http::header::HOST, format!("{host}:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let res = sender.send_request(req).await?;
        anyhow::Ok(res.status())
    };
    let status = tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .context("health probe timed out")?
        .with_context(|| format!("cannot reach {url}"))?;
    if !status.is_success() {
        bail!("{url} answered {status}");
    }
    println!("healthy");
    Ok(())
}
