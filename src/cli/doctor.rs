//! `authswap doctor`: prints the checks of [`crate::doctor`], one line each
//! (`ok`, `warn`, `fail`), and fails when any check fails.

use std::path::Path;

pub(super) async fn run(path: &Path, args: super::DoctorArgs) -> anyhow::Result<()> {
    use crate::doctor::Level;
    let checks = crate::doctor::run(path).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{:<4}  {}: {}", c.level.as_str(), c.check, c.message);
        }
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed; fix what the lines marked fail say");
    }
    Ok(())
}
