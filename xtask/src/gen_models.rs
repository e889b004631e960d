//! `cargo xtask gen-models`: writes catalog models to disk.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use legion_models::{ModelSpec, cache_dir, catalog, committed_dir, ensure, spec, write};

/// Which models to write, and where.
#[derive(clap::Args)]
pub struct Args {
    /// Output directory. Default: testdata/models with --committed, otherwise
    /// the test-model cache (target/legion-models), filled with stamps as
    /// `legion_models::test_model` does.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only this model (repeatable).
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Only the tiny models committed under testdata/models.
    #[arg(long)]
    committed: bool,
}

fn selected(args: &Args) -> Result<Vec<&'static ModelSpec>> {
    for name in &args.only {
        spec(name)?;
    }
    Ok(catalog()
        .iter()
        .filter(|s| !args.committed || s.committed)
        .filter(|s| args.only.is_empty() || args.only.iter().any(|n| n == s.name))
        .collect())
}

/// Writes the selected models, one line per model.
pub fn run(args: &Args) -> Result<()> {
    let specs = selected(args)?;
    let plain = args.out.is_some() || args.committed;
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None if args.committed => committed_dir(),
        None => cache_dir(),
    };
    for model in specs {
        let start = Instant::now();
        let (path, status) = if plain {
            let (path, changed) = write(model.name, &dir)?;
            (path, if changed { "written" } else { "unchanged" })
        } else {
            (ensure(model.name, &dir)?, "ensured")
        };
        let size = std::fs::metadata(&path)?.len();
        let secs = start.elapsed().as_secs_f64();
        println!("{status:>9} {} ({size} bytes, {secs:.2}s)", path.display());
    }
    Ok(())
}
