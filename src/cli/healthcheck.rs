//! `authswap healthcheck`: GET the admin listener's `/healthz` over plain
//! HTTP, so a container HEALTHCHECK needs neither a shell nor curl.

use anyhow::{bail, Context};
use std::path::Path;
use std::time::Duration;

pub(super) async fn run(path: &Path, args: super::HealthcheckArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(u) => u,
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
            format!("http://{addr}/healthz")
        }
    };
    let uri: http::Uri = url.parse().context("--url")?;
    let host = uri.host().context("--url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let probe = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
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
