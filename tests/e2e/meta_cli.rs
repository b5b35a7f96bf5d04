//! The `shardline meta` and `shardline admin` commands as an operator runs
//! them: three node processes forming a group, then admin commands against it.

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shardline");

/// Node processes, killed (by pid) when the test ends, also on panic.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn admin(meta: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["admin", "--meta", meta])
        .args(args)
        .output()
        .expect("run shardline admin")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "admin failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("admin --json prints JSON")
}

#[test]
fn three_meta_processes_form_a_group_that_admin_can_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", testkit::free_port()))
        .collect();
    let mut nodes = Nodes(Vec::new());
    for (i, addr) in addrs.iter().enumerate() {
        let id = (i + 1).to_string();
        let data = dir.path().join(format!("m{id}"));
        let mut cmd = Command::new(BIN);
        cmd.args(["meta", "--id", &id, "--listen", addr, "--data-dir"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if i > 0 {
            cmd.args(["--join", &addrs[0]]);
        }
        nodes.0.push(cmd.spawn().expect("start shardline meta"));
        // Each node joins only after the one before it is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let members = admin(&addrs[0], &["--json", "members"]);
            if members.status.success() {
                let list = json(&members);
                if list.as_array().map_or(0, |a| a.len()) == i + 1 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "node {id} did not join");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let all = addrs.join(",");

    let members = json(&admin(&all, &["--json", "members"]));
    let members = members.as_array().expect("a list");
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["voter"] == true), "{members:?}");
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);

    for (id, port) in [("0", "5432"), ("1", "5433")] {
        let out = admin(
            &all,
            &[
                "add-shard",
                "--id",
                id,
                "--primary",
                &format!("10.0.0.{id}:{port}"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let declared = json(&admin(
        &all,
        &[
            "--json",
            "declare-table",
            "accounts",
            "--key",
            "id",
            "--type",
            "int8",
            "--partitions",
            "16",
        ],
    ));
    assert_eq!(declared["epoch"], 3);

    // A refused command exits non-zero with a message saying why.
    let again = admin(
        &all,
        &["add-shard", "--id", "1", "--primary", "10.0.0.9:5432"],
    );
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("shard 1 already exists"), "{stderr}");

    let placement = json(&admin(&all, &["--json", "placement"]));
    let group = &placement["groups"]["int8_16"];
    let partitions = group["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 16);
    assert_eq!(group["misplaced"], 0, "a new group starts at its target");
    // admin route: a point query goes to the owner of its key's partition.
    let partition = router::hash::partition_of(&[Some(&router::hash::KeyValue::Int8(5))], 16);
    let owner = &partitions[partition as usize]["owner"];
    let route = admin(&all, &["route", "SELECT * FROM accounts WHERE id = 5"]);
    let text = String::from_utf8_lossy(&route.stdout);
    assert_eq!(text.trim(), format!("accounts: shard {owner}"));
    let route = admin(&all, &["route", "SELECT count(*) FROM accounts"]);
    assert!(String::from_utf8_lossy(&route.stdout).contains("every shard"));
    let route = admin(
        &all,
        &[
            "route",
            "/* shardline: shard=1 */ SELECT count(*) FROM accounts",
        ],
    );
    assert!(String::from_utf8_lossy(&route.stdout).contains("routing hint: shard 1"));
    let tables = json(&admin(&all, &["--json", "tables"]));
    assert_eq!(tables[0]["name"], "accounts");
    let status = json(&admin(&all, &["--json", "status"]));
    assert_eq!(status["epoch"], 3);

    // The human-readable form is a table with a header line.
    let shards = admin(&all, &["shards"]);
    let text = String::from_utf8_lossy(&shards.stdout);
    assert!(text.starts_with("shard"), "{text}");
    assert!(text.contains("10.0.0.1:5433"), "{text}");
}
