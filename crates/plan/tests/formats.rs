//! Files of another format version are refused by their version, before their fields
//! are read: an older file's renamed fields would otherwise be reported as missing.

use legion_plan::{PLAN_VERSION, PROFILE_VERSION, Plan, Profile};

#[test]
fn an_old_profile_is_refused_by_its_version() {
    // A version 1 profile: its probes name `send_us` / `recv_us`.
    let old = r#"{"version": 1, "devices": [{"probes": [{"bytes": 4096, "send_us": 5}]}]}"#;
    let err = Profile::from_json(old).unwrap_err();
    assert!(
        err.contains("version Some(1)")
            && err.contains(&format!("reads version {PROFILE_VERSION}")),
        "{err}"
    );
    assert!(err.contains("profile the cluster again"), "{err}");
}

#[test]
fn an_old_plan_is_refused_by_its_version() {
    // The version before this one.
    let before = PLAN_VERSION - 1;
    let old = format!(r#"{{"version": {before}, "candidates": [{{"name": 1}}]}}"#);
    let err = Plan::from_json(&old).unwrap_err();
    assert!(
        err.contains(&format!("version Some({before})"))
            && err.contains(&format!("reads {PLAN_VERSION}")),
        "{err}"
    );
    assert!(err.contains("compile the plan again"), "{err}");
}
