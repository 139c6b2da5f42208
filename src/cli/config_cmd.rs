//! `authswap config check`: validate and print the effective configuration.

use std::path::Path;

pub(super) fn check(path: &Path) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    print!("{}", config.to_redacted_toml());
    for missing in config.missing() {
        eprintln!("warning: {missing}");
    }
    eprintln!("configuration OK ({})", path.display());
    Ok(())
}
