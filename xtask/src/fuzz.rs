//! `cargo xtask fuzz`: many cases of every fuzz target of `legion-fuzz` (the suite runs
//! a few); writes the cases run, accepted and the panics found per target to
//! bench/fuzz.md.

use anyhow::{Result, bail};
use legion_fuzz::{Target, fuzz};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Cases per target.
    #[arg(long, default_value_t = 20_000)]
    cases: u64,
    /// Seed of the mutations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the report.
    #[arg(long, default_value = "bench/fuzz.md")]
    out: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let mut md = String::new();
    writeln!(md, "# Fuzzing: bad input read or refused, never a panic\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask fuzz --cases {} --seed {}` on {}. Each case applies 1-8 \
         random edits (flipped, overwritten, inserted, deleted bytes, or a cut) to a valid \
         seed (crates/fuzz). *accepted*: read without an error (a request: served). The \
         requests' mutated bytes go as they are to their method on a worker in the same \
         process, which decodes them itself; every 16th case writes random bytes, or the \
         HTTP/2 preface and random bytes, on a new connection to its port instead. The \
         worker answered Health after all of them.\n",
        args.cases,
        args.seed,
        crate::bench::host()
    )?;
    writeln!(md, "| target | cases | accepted | panics | seconds |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    let mut panics = vec![];
    for target in Target::ALL {
        eprintln!("fuzzing {} ({} cases)...", target.name(), args.cases);
        let start = Instant::now();
        let report = fuzz(target, args.cases, args.seed)?;
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} |",
            target.name(),
            report.cases,
            report.accepted,
            report.panics.len(),
            start.elapsed().as_secs_f64()
        )?;
        panics.extend(report.panics.into_iter().map(|p| (target.name(), p)));
    }
    if !panics.is_empty() {
        writeln!(md, "\nPanics:\n")?;
        for (target, p) in &panics {
            writeln!(md, "- {target}: {p}")?;
        }
    }
    std::fs::write(&args.out, &md)?;
    print!("{md}");
    if !panics.is_empty() {
        bail!("{} panics", panics.len());
    }
    Ok(())
}
