//! `authswap config check`: validate and print the effective configuration,
//! load every tenant's certificate credential, and warn about what will
//! hurt later (secrets in the file, app credentials expiring within 30
//! days).

use crate::config::{expiry_warning, Config};
use crate::token::AppCertificate;
use anyhow::Context;
use std::path::Path;

pub(super) fn check(path: &Path) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    print!("{}", config.to_redacted_toml());
    for missing in config.missing() {
        eprintln!("warning: {missing}");
    }
    for w in certificate_warnings(&config)? {
        eprintln!("warning: {w}");
    }
    eprintln!("configuration OK ({})", path.display());
    Ok(())
}

/// Loads each certificate credential (refusing one that cannot be used)
/// and warns about the ones that expire within 30 days.
fn certificate_warnings(config: &Config) -> anyhow::Result<Vec<String>> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for (_, section, idp) in config.tenant_configs() {
        let (Some(cert), Some(key)) = (&idp.certificate_file, &idp.private_key_file) else {
            continue;
        };
        let loaded = AppCertificate::load(cert, key)
            .with_context(|| format!("{section}.certificate_file"))?;
        if let Some(w) = expiry_warning(
            &section,
            &format!("certificate {}", loaded.subject()),
            loaded.not_after(),
            now,
        ) {
            out.push(w);
        }
    }
    Ok(out)
}
