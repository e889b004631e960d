//! `legion compile` and `legion plan validate` on committed profiles: plan snapshots
//! (no timing noise: the profiles are files), the plan a lopsided cluster gets, and the
//! bad-input errors.

mod common;

use common::{fails_with, legion, model, ok, scratch};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;

/// Compiles `model` for a committed cluster (a name under testdata/clusters, or a
/// path) and profile; returns the plan's JSON and what compile printed.
fn compile(model_name: &str, cluster: &str, profile: &str, extra: &[&str]) -> (String, String) {
    let name = cluster
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".toml");
    let plan = scratch("compile").join(format!("{model_name}-{name}.json"));
    let m = model(model_name);
    let cluster = match cluster.contains('/') {
        true => cluster.to_string(),
        false => format!("testdata/clusters/{cluster}.toml"),
    };
    let profile = format!("testdata/profiles/{profile}.json");
    let mut args = vec!["compile", &m, "--cluster", &cluster, "--profile", &profile];
    args.extend(["-o", plan.to_str().unwrap()]);
    args.extend(extra);
    let out = legion(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("time per pass:"), "{stdout}");
    let validate = legion(&[
        "plan",
        "validate",
        plan.to_str().unwrap(),
        &m,
        "--cluster",
        &cluster,
    ]);
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    (std::fs::read_to_string(plan).unwrap(), stdout)
}

/// The plan, without each tile's program (`tile`): `compile` has had `plan validate`
/// derive every one of them again from its strip, and with them the snapshots of
/// plans with sub-strips passed 1 MB.
fn snapshot(model_name: &str, cluster: &str) {
    let (plan, _) = compile(model_name, cluster, &format!("{model_name}-{cluster}"), &[]);
    let mut plan: Value = serde_json::from_str(&plan).unwrap();
    for c in plan["candidates"].as_array_mut().unwrap() {
        for g in c["groups"].as_array_mut().unwrap() {
            for t in g["tiles"].as_array_mut().unwrap() {
                t.as_object_mut().unwrap().remove("tile");
            }
        }
    }
    let plan = serde_json::to_string_pretty(&plan).unwrap() + "\n";
    insta::assert_snapshot!(format!("plan_{model_name}_{cluster}"), plan);
}

#[test]
fn vgg16_on_4_fireflies() {
    snapshot("vgg16", "firefly-x4");
}

/// With 300 MB for Legion on each of 4 boards, no board can hold VGG-16's fc6 (411 MB
/// of weights): the plan splits it by neurons, every tile of every candidate fits its
/// board, and every tile computes what the single-device run does.
#[test]
fn vgg16_whose_fc6_fits_no_board_splits_it_by_neurons() {
    let cluster = "testdata/memory/firefly-x4-300mb.toml";
    let (plan, printed) = compile("vgg16", cluster, "vgg16-firefly-x4", &[]);
    assert!(
        printed
            .contains("fc6.ab (392 MiB of weights) fits no board whole: split by channels over 4"),
        "{printed}"
    );
    let ir = legion_ir::import(std::path::Path::new(&model("vgg16")), None).unwrap();
    let fc6 = 19;
    assert_eq!(ir.stages[fc6].name, "fc6.ab");
    assert!(ir.stages[fc6].weight_bytes > 300 << 20);
    let plan: Value = serde_json::from_str(&plan).unwrap();
    for c in plan["candidates"].as_array().unwrap() {
        let groups = c["groups"].as_array().unwrap();
        let holding_fc6 = groups
            .iter()
            .find(|g| {
                g["first"].as_u64().unwrap() as usize <= fc6
                    && fc6 <= g["last"].as_u64().unwrap() as usize
            })
            .unwrap();
        assert_eq!(holding_fc6["channels"], true, "{}", c["name"]);
        for g in groups {
            for t in g["tiles"].as_array().unwrap() {
                let spec: legion_plan::TileSpec =
                    serde_json::from_value(t["tile"].clone()).unwrap();
                let weights = legion_partition::tile_weight_bytes(&ir, &spec);
                assert!(
                    weights < 300 << 20,
                    "{}: {weights} bytes on {}",
                    c["name"],
                    t["device"]
                );
            }
        }
    }
    let plan_file = scratch("compile").join("vgg16-firefly-x4-300mb.json");
    let validated = ok(legion(&[
        "plan",
        "validate",
        plan_file.to_str().unwrap(),
        &model("vgg16"),
        "--run",
    ]));
    assert!(
        validated.contains("every tile matches the single-device run"),
        "{validated}"
    );
}

/// With 150 MB per board every tile of VGG-16 still fits one board (fc6 split four
/// ways is 98 MiB), but no board can hold all its tiles (the convs alone are 56 MiB on
/// each): compile refuses, naming the board.
#[test]
fn a_board_whose_tiles_together_outgrow_its_memory_is_refused() {
    let file = scratch("compile").join("firefly-x4-150mb.toml");
    let cluster = std::fs::read_to_string("testdata/memory/firefly-x4-300mb.toml")
        .unwrap()
        .replace("memory_mb = 300", "memory_mb = 150");
    std::fs::write(&file, cluster).unwrap();
    let m = model("vgg16");
    let out = legion(&[
        "compile",
        &m,
        "--cluster",
        file.to_str().unwrap(),
        "--profile",
        "testdata/profiles/vgg16-firefly-x4.json",
        "-o",
        scratch("compile")
            .join("vgg16-150mb.json")
            .to_str()
            .unwrap(),
    ]);
    fails_with(out, "MiB of weights, above its memory_mb 150");
}

#[test]
fn vgg16_on_3f3o() {
    snapshot("vgg16", "3f3o");
}

#[test]
fn yolov2_on_4_fireflies() {
    snapshot("yolov2", "firefly-x4");
}

#[test]
fn yolov2_on_3f3o() {
    snapshot("yolov2", "3f3o");
}

#[test]
fn resnet18_on_4_fireflies() {
    snapshot("resnet18", "firefly-x4");
}

#[test]
fn resnet18_on_3f3o() {
    snapshot("resnet18", "3f3o");
}

/// A profile where firefly-0 computes 1000x faster than the others: no split can pay
/// for its transfers, so every row of every group runs on firefly-0. Through the hub
/// that is one group (a group boundary costs a round trip to the coordinator); when the
/// board runs its program a boundary costs nothing, so the groups may be several.
#[test]
fn a_far_faster_device_gets_everything() {
    let text = std::fs::read_to_string("testdata/profiles/tiny-cnn-2f2o.json").unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    for stage in p["stages"].as_array_mut().unwrap() {
        for (d, samples) in stage["samples"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            for s in samples.as_array_mut().unwrap() {
                for key in ["median_us", "min_us"] {
                    let t = s[key].as_u64().unwrap();
                    s[key] = if d == 0 {
                        (t / 1000).into()
                    } else {
                        (t * 1000).into()
                    };
                }
            }
        }
    }
    let path = scratch("compile").join("lopsided-profile.json");
    std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
    let m = model("tiny-cnn");
    let compile = |transport: &str| -> Value {
        let plan_path = scratch("compile").join(format!("lopsided-plan-{transport}.json"));
        let out = legion(&[
            "compile",
            &m,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            path.to_str().unwrap(),
            "--transport",
            transport,
            "-o",
            plan_path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(plan_path).unwrap()).unwrap()
    };

    let plan = compile("programs");
    let stages = plan["stages"].as_u64().unwrap();
    let groups = plan["candidates"][0]["groups"].as_array().unwrap();
    assert_eq!(groups.last().unwrap()["last"], stages - 1);
    for g in groups {
        let tiles = g["tiles"].as_array().unwrap();
        assert_eq!(tiles.len(), 1, "{g}");
        assert_eq!(tiles[0]["device"], "firefly-0", "{g}");
    }

    let plan = compile("hub");
    let extracted = &plan["candidates"][0];
    assert_eq!(extracted["name"], "extracted");
    let groups = extracted["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one group: {groups:?}");
    assert_eq!(groups[0]["first"], 0);
    assert_eq!(groups[0]["last"], stages - 1);
    assert_eq!(groups[0]["split"], false);
    let tiles = groups[0]["tiles"].as_array().unwrap();
    assert_eq!(tiles.len(), 1);
    assert_eq!(tiles[0]["device"], "firefly-0");
    // A single group has no Wild Card.
    assert_eq!(plan["candidates"].as_array().unwrap().len(), 1);
    assert_eq!(plan["chosen"], 0);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let plan = scratch("compile").join("bad.json");
    let plan = plan.to_str().unwrap();
    let (tiny, residual) = (model("tiny-cnn"), model("tiny-residual"));
    let profile = "testdata/profiles/tiny-cnn-2f2o.json";
    // A profile of another model.
    fails_with(
        legion(&[
            "compile",
            &residual,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "the profile is of model",
    );
    // A cluster that does not match the profile.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/firefly-x4.toml",
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "but the profile testdata/profiles/tiny-cnn-2f2o.json was measured on",
    );
    // An empty cluster.
    let empty = scratch("compile").join("empty.toml");
    std::fs::write(&empty, "[coordinator]\nmbps = 1000.0\n").unwrap();
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            empty.to_str().unwrap(),
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "no devices",
    );
    // An unknown predictor.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "--predictor",
            "oracle",
            "-o",
            plan,
        ]),
        "oracle",
    );
    // A legion profile for --mode fss.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "--mode",
            "fss",
            "-o",
            plan,
        ]),
        "needs a profile from `legion profile --mode fss`",
    );
}

/// Writes the committed tiny-cnn profile with links 1000x faster (so splitting pays)
/// and returns its path.
fn fast_links_profile() -> PathBuf {
    let text = std::fs::read_to_string("testdata/profiles/tiny-cnn-2f2o.json").unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    for device in p["devices"].as_array_mut().unwrap() {
        for probe in device["probes"].as_array_mut().unwrap() {
            for key in ["in_us", "out_us"] {
                probe[key] = (probe[key].as_u64().unwrap() / 1000).into();
            }
        }
    }
    let path = scratch("compile").join("fast-links-profile.json");
    std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
    path
}

#[test]
fn validate_rejects_a_tampered_plan() {
    let tiny = model("tiny-cnn");
    let plan_path = scratch("compile").join("fast-links-plan.json");
    let profile = fast_links_profile();
    let out = legion(&[
        "compile",
        &tiny,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        profile.to_str().unwrap(),
        "-o",
        plan_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let valid = legion(&["plan", "validate", plan_path.to_str().unwrap(), &tiny]);
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    let text = std::fs::read_to_string(&plan_path).unwrap();
    let mut plan: Value = serde_json::from_str(&text).unwrap();
    // Move a split group's strip boundary without changing its tiles.
    let c = plan["chosen"].as_u64().unwrap() as usize;
    let groups = plan["candidates"][c]["groups"].as_array_mut().unwrap();
    let split = groups
        .iter_mut()
        .find(|g| g["split"] == true && g["tiles"].as_array().unwrap().len() >= 2)
        .expect("with fast links, tiny-cnn on 2F+2O splits some group");
    // Two tiles whose strips meet (a device's sub-strips are listed in run order).
    let tiles = split["tiles"].as_array().unwrap();
    let (i, j) = (0..tiles.len())
        .flat_map(|i| (0..tiles.len()).map(move |j| (i, j)))
        .find(|&(i, j)| tiles[i]["strip"]["end"] == tiles[j]["strip"]["start"])
        .expect("the strips of a split group meet");
    let end = tiles[i]["strip"]["end"].as_u64().unwrap();
    split["tiles"][i]["strip"]["end"] = (end + 1).into();
    split["tiles"][j]["strip"]["start"] = (end + 1).into();
    let path = scratch("compile").join("tampered.json");
    std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
    fails_with(
        legion(&["plan", "validate", path.to_str().unwrap(), &tiny]),
        "is not the one its strip",
    );
    // A plan for another model.
    fails_with(
        legion(&[
            "plan",
            "validate",
            path.to_str().unwrap(),
            &model("tiny-residual"),
        ]),
        "the plan is for model",
    );
}

#[test]
fn plan_show_draws_every_device_and_group() {
    let tiny = model("tiny-cnn");
    let dir = scratch("compile");
    let (plan, svg) = (dir.join("show-plan.json"), dir.join("show.svg"));
    let profile = fast_links_profile();
    let out = legion(&[
        "compile",
        &tiny,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        profile.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = legion(&[
        "plan",
        "show",
        plan.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let chosen = &plan["candidates"][plan["chosen"].as_u64().unwrap() as usize];
    for d in ["firefly-0", "firefly-1", "odroid-0", "odroid-1"] {
        assert!(picture.contains(d), "{d} has no row");
    }
    let groups = chosen["groups"].as_array().unwrap();
    for k in 0..groups.len() {
        assert!(
            picture.contains(&format!("g{k}: ")),
            "group {k} is not drawn"
        );
    }
    // Three bars (receive, compute, send) per device and group, at least.
    let tiles: usize = groups
        .iter()
        .map(|g| g["tiles"].as_array().unwrap().len())
        .sum();
    assert!(picture.matches("<rect").count() >= 3 * tiles);

    // With the model and the cluster: the programs, a compute bar per tile run and a
    // line per transfer, the coordinator on a row of its own.
    let (plan_path, programs_svg) = (dir.join("show-plan.json"), dir.join("show-programs.svg"));
    ok(legion(&[
        "plan",
        "show",
        plan_path.to_str().unwrap(),
        "--model",
        &tiny,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "-o",
        programs_svg.to_str().unwrap(),
    ]));
    let transfers = picture.matches(TRANSFER_LINE).count();
    assert_eq!(transfers, 0, "transfer lines without --model");
    let picture = std::fs::read_to_string(&programs_svg).unwrap();
    assert!(picture.contains("coordinator"), "no coordinator row");
    let steps = |op: &str| -> usize {
        chosen["programs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["steps"].as_array().unwrap())
            .filter(|s| s["op"] == op)
            .count()
    };
    assert!(steps("receive") > 0);
    // One line per transfer (every receive has its send), in the send colour.
    assert_eq!(picture.matches(TRANSFER_LINE).count(), steps("receive"));
    assert!(picture.matches("<rect").count() >= steps("run"));
    // The model must be the plan's.
    fails_with(
        legion(&[
            "plan",
            "show",
            plan_path.to_str().unwrap(),
            "--model",
            &model("tiny-residual"),
            "--cluster",
            "testdata/clusters/2f2o.toml",
        ]),
        "is not the plan's model",
    );
}

/// How the SVG writes a transfer's line: a polyline in the send colour (100, 170, 100).
const TRANSFER_LINE: &str = r##"<polyline fill="none" opacity="1" stroke="#64AA64""##;

/// `legion compile` on tiny-cnn with the committed profile, plus `extra`.
fn compile_tiny(extra: &[&str]) -> Output {
    let m = model("tiny-cnn");
    let mut args = vec![
        "compile",
        &m,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        "testdata/profiles/tiny-cnn-2f2o.json",
    ];
    args.extend(extra);
    legion(&args)
}

#[test]
fn dump_after_cost_prints_the_table_the_plan_was_chosen_from() {
    let plan = scratch("compile").join("dump-cost.json");
    // Through the hub the plan runs the table's strips; with programs the placement
    // cuts the groups again given what the boards hold (tests/placement.rs).
    let out = compile_tiny(&[
        "--dump-after",
        "cost",
        "--transport",
        "hub",
        "-o",
        plan.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (dump, rest) = stdout.split_once("fused-layer configuration").unwrap();
    assert!(dump.starts_with("cost: "), "{dump}");
    // Every group of the plan is a line of the table, with its predicted time.
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let chosen = &plan["candidates"][plan["chosen"].as_u64().unwrap() as usize];
    for g in chosen["groups"].as_array().unwrap() {
        // A device option can leave a device without rows, so the plan's tile count
        // need not be the option: find the group's line with the plan's time.
        let span = format!("{}..{} x", g["first"], g["last"]);
        let plan_ms = g["predicted_us"].as_u64().unwrap() as f64 / 1e3;
        let tiles: Vec<String> = g["tiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{} ", t["device"].as_str().unwrap()))
            .collect();
        let found = dump.lines().skip(1).any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let table_ms: f64 = fields[2].parse().unwrap();
            // The table keeps fractions of a µs; the plan rounds them.
            l.trim_start().starts_with(&span)
                && (table_ms - plan_ms).abs() <= 0.0015
                && tiles.iter().all(|t| l.contains(t.as_str()))
        });
        assert!(
            found,
            "no line for {span} at {plan_ms} ms on {tiles:?} in\n{dump}"
        );
    }
    assert!(rest.contains("plan written to"), "{rest}");

    // The same dump as JSON: one entry per legal choice, each with its tiles' times.
    let out = compile_tiny(&["--dump-after", "cost", "--json", "--stop-after", "cost"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["pass"], "cost");
    let entries = doc["dump"].as_array().unwrap();
    assert_eq!(entries.len(), dump.lines().count() - 1);
    for e in entries {
        let tiles = e["tiles"].as_array().unwrap();
        assert!(!tiles.is_empty(), "{e}");
        assert!(
            tiles.len() <= e["devices"].as_u64().unwrap() as usize,
            "{e}"
        );
        assert!(e["cost_us"].as_f64().unwrap() > 0.0, "{e}");
    }
}

#[test]
fn stop_after_fusion_writes_no_plan_and_dumps_the_flc() {
    let plan = scratch("compile").join("stopped.json");
    let _ = std::fs::remove_file(&plan);
    let out = compile_tiny(&[
        "--dump-after",
        "partition",
        "--dump-after",
        "fusion",
        "--stop-after",
        "fusion",
        "-o",
        plan.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!plan.exists(), "a stopped compile wrote {}", plan.display());
    assert!(
        stderr.contains("stopped after fusion: no plan written"),
        "{stderr}"
    );
    // Partition's dump names each device's strip; fusion's the FLC and Wild Card.
    let (partition, fusion) = stdout.split_once("fusion: FLC [").unwrap();
    assert!(partition.starts_with("partition: "), "{partition}");
    assert!(partition.contains("firefly-0 0.."), "{partition}");
    assert!(fusion.contains("egg: "), "{fusion}");
    assert!(fusion.contains("wild card: "), "{fusion}");
    // No codegen ran.
    assert!(!stdout.contains("codegen"), "{stdout}");
    assert!(!stderr.contains("codegen"), "{stderr}");

    // An unknown pass is named, with the passes there are.
    let out = compile_tiny(&["--stop-after", "fuse"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("partition, cost, fusion, codegen"),
        "{stderr}"
    );
}

#[test]
fn baselines_compile_through_the_same_passes() {
    for (search, name) in [("no-fusion", "no-fusion"), ("one-block", "one-block")] {
        let plan = scratch("compile").join(format!("{search}.json"));
        let out = compile_tiny(&["--search", search, "-o", plan.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
        let candidates = plan["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 1, "a baseline has no Wild Card");
        assert_eq!(candidates[0]["name"], name);
        let groups = candidates[0]["groups"].as_array().unwrap();
        let stages = plan["stages"].as_u64().unwrap() as usize;
        if search == "no-fusion" {
            assert_eq!(groups.len(), stages, "one group per stage");
        } else {
            assert!(groups.len() < stages, "runs fused: {groups:?}");
        }
    }
}

/// `model` imported, with the committed profile and cluster file of `cluster`
/// (testdata/profiles/MODEL-CLUSTER.json, testdata/clusters/CLUSTER.toml), for
/// compiling in process.
fn committed_setup(
    model_name: &str,
    cluster: &str,
) -> (legion_ir::Ir, legion_plan::Profile, legion_plan::Cluster) {
    let ir = legion_ir::import(std::path::Path::new(&model(model_name)), None).unwrap();
    let path = format!("testdata/profiles/{model_name}-{cluster}.json");
    let profile = legion_plan::Profile::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    let file = format!("testdata/clusters/{cluster}.toml");
    let cluster = legion_plan::Cluster::load(std::path::Path::new(&file)).unwrap();
    (ir, profile, cluster)
}

/// A latency compile with boards running their programs adds the FLC searched for a
/// stream only when it is predicted faster than the latency search's candidates:
/// VGG-16 on firefly-0, firefly-1 and odroid-2 of the 3F+3O profile, where one is
/// (docs/architecture.md, "FLCs for a stream"), and on all six boards, where none is.
#[test]
fn a_latency_compile_adds_the_flc_for_a_stream_only_when_predicted_faster() {
    use legion_pipeline::{CompileOptions, PassTimes, StreamFlcs, boards_of};
    let (ir, profile, all) = committed_setup("vgg16", "3f3o");
    let mut three = all.clone();
    three
        .devices
        .retain(|d| ["firefly-0", "firefly-1", "odroid-2"].contains(&d.name.as_str()));
    for (cluster, faster) in [(&three, true), (&all, false)] {
        let cut = boards_of(&profile, cluster).unwrap();
        let candidates = |stream_flcs| {
            let options = CompileOptions {
                stream_flcs,
                ..CompileOptions::legion("vgg16-3f3o.json")
            };
            let compiled = legion_pipeline::compile(
                &ir,
                &cut,
                cluster,
                &options,
                None,
                &mut PassTimes::default(),
            )
            .unwrap();
            compiled.plan.unwrap()
        };
        let off = candidates(StreamFlcs::Off);
        let on = candidates(StreamFlcs::Faster(legion_pipeline::STREAM_ROUNDS));
        assert!(
            off.candidates
                .iter()
                .all(|c| !c.name.starts_with("balanced-"))
        );
        let balanced: Vec<_> = on
            .candidates
            .iter()
            .filter(|c| c.name.starts_with("balanced-"))
            .collect();
        let fastest_off = off.candidates.iter().map(|c| c.predicted_us).min().unwrap();
        if faster {
            assert_eq!(balanced.len(), 1, "one FLC for a stream joins");
            assert!(balanced[0].predicted_us < fastest_off);
            assert_eq!(on.chosen().name, balanced[0].name);
        } else {
            assert!(balanced.is_empty(), "none is predicted faster");
            assert_eq!(on.chosen().name, off.chosen().name);
        }
        // The latency search's candidates are the same either way.
        assert_eq!(on.candidates.len() - balanced.len(), off.candidates.len());
    }
}

/// A throughput compile spreads each FLC for a stream over alike boards
/// (docs/architecture.md, "Spreading a stream over alike boards"): VGG-16 on the
/// 4-Firefly profile with its boards made alike (device 0's samples for all, profiled
/// as one). Each `balanced-k-spread` runs its twin `balanced-k`'s groups, each on as
/// many boards, and its busiest board works less; where the boards are not alike, no
/// FLC is spread.
#[test]
fn a_throughput_compile_spreads_the_flcs_for_a_stream_over_alike_boards() {
    use legion_pipeline::{CompileOptions, PassTimes, STREAM_ROUNDS, StreamFlcs};
    use std::collections::{BTreeSet, HashMap};
    let (ir, measured, cluster) = committed_setup("vgg16", "firefly-x4");
    let mut alike = measured.clone();
    let names: Vec<String> = alike.devices.iter().map(|d| d.name.clone()).collect();
    let first = alike.devices[0].clone();
    for d in &mut alike.devices {
        d.gflops = first.gflops;
        d.link = first.link;
        d.probes = first.probes.clone();
        d.profiled_with = names.iter().filter(|n| **n != d.name).cloned().collect();
    }
    for st in &mut alike.stages {
        for samples in [&mut st.samples, &mut st.channel_samples] {
            if let Some(own) = samples.first().cloned() {
                samples.iter_mut().for_each(|s| *s = own.clone());
            }
        }
    }
    let compiled = |profile: &legion_plan::Profile| {
        let options = CompileOptions {
            stream_flcs: StreamFlcs::All(STREAM_ROUNDS),
            ..CompileOptions::legion("vgg16-firefly-x4.json")
        };
        legion_pipeline::compile(
            &ir,
            profile,
            &cluster,
            &options,
            None,
            &mut PassTimes::default(),
        )
        .unwrap()
        .plan
        .unwrap()
    };
    // Per board, its time in every group (input, compute, output), µs.
    let busiest = |c: &legion_plan::Candidate| {
        let mut loads: HashMap<&str, u64> = HashMap::new();
        for t in c.groups.iter().flat_map(|g| &g.tiles) {
            *loads.entry(t.device.as_str()).or_default() += t.in_us + t.compute_us + t.out_us;
        }
        loads.into_values().max().unwrap()
    };
    let boards = |g: &legion_plan::PlanGroup| -> BTreeSet<String> {
        g.tiles.iter().map(|t| t.device.clone()).collect()
    };
    let plan = compiled(&alike);
    let spread: Vec<_> = plan
        .candidates
        .iter()
        .filter(|c| c.name.ends_with("-spread"))
        .collect();
    assert!(!spread.is_empty(), "some FLC for a stream is spread");
    for s in spread {
        let twin_name = s.name.trim_end_matches("-spread");
        let twin = plan
            .candidates
            .iter()
            .find(|c| c.name == twin_name)
            .unwrap();
        assert_eq!(s.groups.len(), twin.groups.len(), "{}", s.name);
        for (a, b) in s.groups.iter().zip(&twin.groups) {
            assert_eq!((a.first, a.last), (b.first, b.last), "{}", s.name);
            assert_eq!(boards(a).len(), boards(b).len(), "{}", s.name);
        }
        assert!(
            s.groups
                .iter()
                .zip(&twin.groups)
                .any(|(a, b)| boards(a) != boards(b)),
            "{} moves a group",
            s.name
        );
        assert!(
            busiest(s) < busiest(twin),
            "{}: busiest board {} µs against {} under {twin_name}",
            s.name,
            busiest(s),
            busiest(twin)
        );
    }
    // Boards profiled each on their own are not alike: nothing is spread.
    let plan = compiled(&measured);
    assert!(plan.candidates.iter().all(|c| !c.name.ends_with("-spread")));
}
