//! The C header and lb-common describe the same bytes: every shared struct's size, member names
//! and offsets, and every shared enum's values, as the compiled object's BTF records them.

use std::{collections::BTreeMap, process::Command};

use lb_common::{ENUMS, LAYOUTS};
use serde_json::Value;

/// Structs in the object's BTF that are the program's own, not part of the shared ABI.
const KERNEL_ONLY: &[&str] = &["steer_abi_anchor"];

/// The object's BTF types, dumped once for all tests (they run in parallel).
fn btf_types() -> Vec<Value> {
    static TYPES: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    TYPES.get_or_init(dump_btf).clone()
}

fn dump_btf() -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!("steer-btf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    let object = dir.join("steer.bpf.o");
    std::fs::write(&object, lb_ebpf::steer_bpf()).expect("writing the object");
    let output = Command::new("bpftool")
        .args(["-j", "btf", "dump", "file"])
        .arg(&object)
        .output()
        .expect("bpftool is needed for this test: run `cargo xtask deps`");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        output.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump: Value = serde_json::from_slice(&output.stdout).expect("bpftool printed JSON");
    dump["types"].as_array().expect("a types array").clone()
}

fn named<'a>(types: &'a [Value], kind: &str) -> BTreeMap<&'a str, &'a Value> {
    types
        .iter()
        .filter(|t| t["kind"] == kind)
        .filter_map(|t| Some((t["name"].as_str()?, t)))
        .filter(|(name, _)| name.starts_with("steer_") && !KERNEL_ONLY.contains(name))
        .collect()
}

#[test]
fn structs_match_btf() {
    let types = btf_types();
    let structs = named(&types, "STRUCT");
    let rust: Vec<&str> = LAYOUTS.iter().map(|l| l.c_name).collect();
    let c: Vec<&str> = structs.keys().copied().collect();
    let mut rust_sorted = rust.clone();
    rust_sorted.sort_unstable();
    assert_eq!(
        c, rust_sorted,
        "shared structs in C and in lb-common differ"
    );

    for layout in LAYOUTS {
        let btf = structs[layout.c_name];
        assert_eq!(
            btf["size"].as_u64(),
            Some(layout.size as u64),
            "size of {}",
            layout.c_name
        );
        let members: Vec<(String, u64)> = btf["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                let name = m["name"].as_str().expect("member name").to_owned();
                let bits = m["bits_offset"].as_u64().expect("bits_offset");
                (name, bits / 8)
            })
            .collect();
        let expected: Vec<(String, u64)> = layout
            .members
            .iter()
            .map(|(name, offset)| ((*name).to_owned(), *offset as u64))
            .collect();
        assert_eq!(members, expected, "members of {}", layout.c_name);
    }
}

#[test]
fn enums_match_btf() {
    let types = btf_types();
    let enums = named(&types, "ENUM");
    let mut rust: Vec<&str> = ENUMS.iter().map(|(name, _)| *name).collect();
    rust.sort_unstable();
    assert_eq!(
        enums.keys().copied().collect::<Vec<_>>(),
        rust,
        "shared enums in C and in lb-common differ"
    );
    for (name, values) in ENUMS {
        let btf: Vec<(String, u64)> = enums[name]["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| {
                let value = v["val"].as_u64().expect("enum value");
                (v["name"].as_str().expect("name").to_owned(), value)
            })
            .collect();
        let expected: Vec<(String, u64)> = values
            .iter()
            .map(|(n, v)| ((*n).to_owned(), u64::from(*v)))
            .collect();
        assert_eq!(btf, expected, "values of enum {name}");
    }
}
