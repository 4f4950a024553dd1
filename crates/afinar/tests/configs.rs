//! Every worked example in `configs/` is a run config afinar accepts
//! (parsed, unknown keys refused, validated) and opens with the command
//! that runs it.

use afinar::config::Plan;
use std::path::Path;

#[test]
fn every_example_config_is_valid_and_names_its_command() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        Plan::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let first = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            first
                .lines()
                .next()
                .is_some_and(|l| l.starts_with("# afinar train configs/") && l.ends_with(&name)),
            "{name}: the first line is not the command that runs it"
        );
        n += 1;
    }
    assert!(n >= 10, "only {n} configs found in {}", dir.display());
}
