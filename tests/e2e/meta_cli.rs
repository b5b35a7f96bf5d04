//! The `shardline meta` and `shardline admin` commands as an operator runs
//! them: three node processes forming a group, then admin commands against it;
//! and `shardline admin cache` against a proxy's admin console.

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{eventually, start_proxy, Options};
use crate::sharded_env::ShardedEnv;

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

/// `shardline admin --proxy URL ARGS`, run without blocking the runtime
/// the in-process proxy lives on.
async fn admin_at(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(["admin", "--proxy", url])
        .args(args)
        .output()
        .await
        .expect("run shardline admin")
}

/// `shardline admin --proxy URL cache ARGS`.
async fn admin_cache(url: &str, args: &[&str]) -> Output {
    let args: Vec<&str> = std::iter::once("cache")
        .chain(args.iter().copied())
        .collect();
    admin_at(url, &args).await
}

/// What `admin cache` printed, after checking that it succeeded.
fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "admin failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cache_enables_disables_and_flushes_through_the_console() {
    // Arrange: a proxy with a cache but no cached table, and an admin user.
    let env = ShardedEnv::with_sections(
        1,
        Options::default(),
        r#"
[cache]
max_bytes = 1048576

[[users]]
name = "ops"
auth = "trust"
admin = true
"#,
    )
    .await;
    let url = format!("postgres://ops@127.0.0.1:{}/shardline", env.addr.port());

    // `admin show` prints a console view: as a table, and as JSON objects
    // (the console's own connection is one of the clients).
    let pools = stdout(&admin_at(&url, &["show", "pools"]).await);
    assert!(pools.starts_with("database"), "{pools}");
    let clients = json(&admin_at(&url, &["--json", "show", "clients"]).await);
    let listed = clients.as_array().expect("a list of clients");
    assert!(
        listed
            .iter()
            .any(|c| c["user"] == "ops" && c["database"] == "shardline"),
        "{clients}"
    );

    let stats = json(&admin_cache(&url, &["--json", "stats"]).await);
    assert_eq!(stats["tables"], json!([]), "{stats}");
    assert_eq!(
        stats["max_bytes"], 1_048_576,
        "the configured bound, as a number"
    );
    assert_eq!(stats["feeds"], json!([]), "no table, no change feed");

    // Act: enable accounts.
    let enabled = stdout(&admin_cache(&url, &["enable", "accounts"]).await);
    assert!(
        enabled.starts_with("cache enabled for accounts"),
        "{enabled}"
    );

    // Check: it is cached, the proxy starts the shard's change feed, and the
    // table form lists it.
    let stats = json(&admin_cache(&url, &["--json", "stats"]).await);
    assert_eq!(stats["tables"], json!(["accounts"]), "{stats}");
    let feed_started = eventually(Duration::from_secs(5), || async {
        let stats = json(&admin_cache(&url, &["--json", "stats"]).await);
        stats["feeds"]
            .as_array()
            .is_some_and(|feeds| feeds.len() == 1)
    })
    .await;
    assert!(feed_started, "enabling a table started no change feed");
    let text = stdout(&admin_cache(&url, &["stats"]).await);
    let mut lines = text.lines();
    assert_eq!(
        lines
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["name", "value"]),
        "{text}"
    );
    assert!(
        lines.any(|l| l.split_whitespace().collect::<Vec<_>>() == ["tables", "accounts"]),
        "{text}"
    );

    // Disable: no longer cached. Flush: succeeds and leaves nothing.
    let disabled = json(&admin_cache(&url, &["--json", "disable", "accounts"]).await);
    assert_eq!(disabled["ok"], true, "{disabled}");
    let stats = json(&admin_cache(&url, &["--json", "stats"]).await);
    assert_eq!(stats["tables"], json!([]), "{stats}");
    let flushed = stdout(&admin_cache(&url, &["flush"]).await);
    assert!(flushed.starts_with("cache flushed"), "{flushed}");
    let stats = json(&admin_cache(&url, &["--json", "stats"]).await);
    assert_eq!(stats["entries"], 0, "{stats}");

    // A name the console would misread is refused before anything is sent.
    let refused = admin_cache(&url, &["enable", "accounts; CACHE FLUSH"]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not a table name"), "{stderr}");

    // A proxy that follows no shard map has no cache: every action says so
    // and exits non-zero.
    let (plain, _stop) = start_proxy(&format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[[users]]
name = "ops"
auth = "trust"
admin = true

[[databases]]
name = "db"
port = {}
dbname = "postgres"
server_user = "postgres"
server_password = "postgres"
"#,
        env.pg[0].port()
    ))
    .await;
    let url = format!("postgres://ops@127.0.0.1:{}/shardline", plain.port());
    for action in [&["stats"][..], &["enable", "accounts"], &["flush"]] {
        let output = admin_cache(&url, action).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{action:?} succeeded");
        assert!(
            stderr.contains("shardline admin: the proxy refused: this proxy has no cache"),
            "{action:?}: {stderr}"
        );
    }
}
