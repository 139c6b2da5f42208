//! `authswap admin signin-link`: a one-time link to the admin console, for
//! operators at the terminal and for headless browsers. Works while `serve`
//! runs in another process: the link's nonce (hashed) is in the store.

use super::AdminCommand;
use crate::admin::credential::{admin_base_url, issue_signin_link, SIGNIN_LINK_TTL};
use std::path::Path;

pub(super) async fn run(path: &Path, cmd: AdminCommand) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    match cmd {
        AdminCommand::SigninLink { next } => {
            if !next.starts_with('/') || next.starts_with("//") {
                anyhow::bail!("--next must be a path on the admin listener, such as /identities");
            }
            let store = crate::store::open(&config).await?;
            let nonce = issue_signin_link(store.as_ref()).await?;
            let mut url = format!("{}/login/once/{}", admin_base_url(&config), nonce.expose());
            if next != "/identities" {
                url.push_str("?next=");
                url.push_str(
                    &url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>(),
                );
            }
            println!("{url}");
            eprintln!(
                "Open it within {} seconds; it works once.",
                SIGNIN_LINK_TTL.as_secs()
            );
            Ok(())
        }
    }
}
