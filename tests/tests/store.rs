//! The config store's file and etcd drivers against a real filesystem, real concurrent
//! processes and a real etcd. No root needed.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tokio::process::Command;

use lb_userspace::spec::DriverConfig;
use lb_userspace::store::{ArgValue, ETCD_PREFIX, SavedArgs, Store, StoreError};
use tests::etcd::Etcd;

/// Saves per writer in the concurrency tests: enough to interleave, quick under flock.
const SAVES: usize = 40;
/// Env vars that turn `concurrent_saver_child` into the second process of
/// `concurrent_saves_from_two_processes_keep_both`.
const CHILD_PATH: &str = "STEER_STORE_CHILD_PATH";
const CHILD_NAME: &str = "STEER_STORE_CHILD_NAME";

fn args(model: &str) -> SavedArgs {
    SavedArgs {
        binary: "/opt/llama/llama-server".into(),
        args: BTreeMap::from([
            ("--model".into(), ArgValue::Value(model.into())),
            ("--port".into(), ArgValue::Value("8081".into())),
            ("--flash-attn".into(), ArgValue::Flag),
        ]),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("steer-store-it-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The directory's entries, sorted.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .expect("listing the temp dir")
            .map(|e| {
                e.expect("reading a dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

async fn file_store(path: &Path, name: &str) -> Store {
    let driver = DriverConfig::File {
        path: path.to_path_buf(),
        name: name.into(),
    };
    Store::open(&driver).await.expect("opening the file store")
}

/// Saves under two names of one store, one of them twice: each loads back its own last save.
async fn two_names_keep_their_own(gpt: &Store, deepseek: &Store) {
    gpt.save(&args("/m/gpt.gguf")).await.expect("save gpt");
    deepseek
        .save(&args("/m/deepseek.gguf"))
        .await
        .expect("save deepseek");
    gpt.save(&args("/m/gpt-2.gguf"))
        .await
        .expect("save gpt again");
    assert_eq!(loaded(gpt).await, Some(args("/m/gpt-2.gguf")));
    assert_eq!(loaded(deepseek).await, Some(args("/m/deepseek.gguf")));
}

/// An etcd store whose cache is `cache`.
async fn etcd_store(addr: &str, name: &str, cache: &Path) -> Result<Store, StoreError> {
    let driver = DriverConfig::Etcd {
        addr: addr.into(),
        name: name.into(),
        cache: Some(cache.to_path_buf()),
    };
    Store::open(&driver).await
}

/// The applied arguments a store holds.
async fn loaded(store: &Store) -> Option<SavedArgs> {
    store.load().await.expect("load").map(|stored| stored.args)
}

/// The supervisor keeps a store in spawned tasks: it and its futures must be `Send`.
#[tokio::test]
async fn stores_and_their_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    let dir = TempDir::new();
    let driver = DriverConfig::File {
        path: dir.file("config.toml"),
        name: "gpt".into(),
    };
    send(&Store::open(&driver));
    let store = Store::open(&driver).await.expect("open");
    send(&store.load());
    send(&store.save(&args("/m.gguf")));
}

#[tokio::test]
async fn file_round_trip() {
    let dir = TempDir::new();
    let store = file_store(&dir.file("config.toml"), "gpt").await;
    assert_eq!(store.name(), "gpt");
    assert_eq!(loaded(&store).await, None);
    store.save(&args("/m/a.gguf")).await.expect("save");
    assert_eq!(loaded(&store).await, Some(args("/m/a.gguf")));
    store.save(&args("/m/b.gguf")).await.expect("save again");
    // A second handle (as after a restart) sees the last save.
    let reopened = file_store(&dir.file("config.toml"), "gpt").await;
    assert_eq!(loaded(&reopened).await, Some(args("/m/b.gguf")));
}

#[tokio::test]
async fn two_names_in_one_file_do_not_disturb_each_other() {
    let dir = TempDir::new();
    let path = dir.file("config.toml");
    let gpt = file_store(&path, "gpt").await;
    let deepseek = file_store(&path, "deepseek").await;
    two_names_keep_their_own(&gpt, &deepseek).await;
    let text = fs::read_to_string(&path).expect("reading the file");
    assert!(
        text.contains("[gpt.args]") && text.contains("[deepseek.args]"),
        "{text}"
    );
}

#[tokio::test]
async fn other_hand_written_tables_survive_a_save() {
    let dir = TempDir::new();
    let path = dir.file("config.toml");
    fs::write(
        &path,
        "# operator notes\n[other]\nbinary = \"/usr/bin/llama-server\"\n\
         [other.args]\n\"-c\" = 4096\n\"--mlock\" = true\n",
    )
    .expect("writing the file");
    let other_before = file_store(&path, "other").await.load().await.expect("load");
    file_store(&path, "gpt")
        .await
        .save(&args("/m.gguf"))
        .await
        .expect("save");
    let other_after = file_store(&path, "other").await.load().await.expect("load");
    assert_eq!(other_before, other_after);
    assert!(other_after.is_some());
}

#[tokio::test]
async fn saves_are_atomic_and_leave_no_temp_files() {
    let dir = TempDir::new();
    let store = file_store(&dir.file("config.toml"), "gpt").await;
    for i in 0..5 {
        store
            .save(&args(&format!("/m/{i}.gguf")))
            .await
            .expect("save");
    }
    // The config and its lock file, nothing half-written beside them.
    assert_eq!(dir.entries(), ["config.toml", "config.toml.lock"]);
}

#[tokio::test]
async fn corrupt_file_names_path_and_line_and_is_never_overwritten() {
    let dir = TempDir::new();
    let path = dir.file("config.toml");
    let corrupt = "[other]\nbinary = \"/b\"\n\n[gpt\nbinary = \"/x\"\n";
    fs::write(&path, corrupt).expect("writing the file");
    let store = file_store(&path, "gpt").await;

    let err = store
        .load()
        .await
        .expect_err("a corrupt file must not load");
    assert!(
        matches!(err, StoreError::Corrupt { line: 4, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{}:4:", path.display())),
        "{text}"
    );

    let err = store
        .save(&args("/m.gguf"))
        .await
        .expect_err("a save must refuse to replace a corrupt file");
    assert!(
        matches!(err, StoreError::Corrupt { line: 4, .. }),
        "{err:?}"
    );
    assert_eq!(fs::read_to_string(&path).expect("reading"), corrupt);
    assert_eq!(dir.entries(), ["config.toml", "config.toml.lock"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves_from_two_tasks_keep_both() {
    let dir = TempDir::new();
    let path = dir.file("config.toml");
    let writers = ["gpt", "deepseek"].map(|name| {
        let path = path.clone();
        tokio::spawn(async move {
            let store = file_store(&path, name).await;
            for i in 0..SAVES {
                store
                    .save(&args(&format!("/m/{name}-{i}.gguf")))
                    .await
                    .expect("save");
            }
        })
    });
    for writer in writers {
        writer.await.expect("writer task");
    }
    for name in ["gpt", "deepseek"] {
        let last = format!("/m/{name}-{}.gguf", SAVES - 1);
        let store = file_store(&path, name).await;
        assert_eq!(loaded(&store).await, Some(args(&last)), "{name}");
    }
}

#[tokio::test]
async fn concurrent_saves_from_two_processes_keep_both() {
    let dir = TempDir::new();
    let path = dir.file("config.toml");
    // The other process is this test binary running only `concurrent_saver_child`.
    // Its output is captured: its own `test result:` line must not reach `cargo xtask test`'s
    // summary.
    let child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", "concurrent_saver_child", "--ignored", "--quiet"])
        .env(CHILD_PATH, &path)
        .env(CHILD_NAME, "deepseek")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning the second saver");
    save_many(&path, "gpt").await;
    let out = child
        .wait_with_output()
        .await
        .expect("waiting for the second saver");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "second saver: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["gpt", "deepseek"] {
        let last = format!("/m/{name}-{}.gguf", SAVES - 1);
        let store = file_store(&path, name).await;
        assert_eq!(loaded(&store).await, Some(args(&last)), "{name}");
    }
}

/// The second process of `concurrent_saves_from_two_processes_keep_both`; does nothing when
/// run on its own.
#[tokio::test]
#[ignore = "helper process, started by concurrent_saves_from_two_processes_keep_both"]
async fn concurrent_saver_child() {
    let (Some(path), Some(name)) = (std::env::var_os(CHILD_PATH), std::env::var(CHILD_NAME).ok())
    else {
        return;
    };
    save_many(Path::new(&path), &name).await;
}

async fn save_many(path: &Path, name: &str) {
    let store = file_store(path, name).await;
    for i in 0..SAVES {
        store
            .save(&args(&format!("/m/{name}-{i}.gguf")))
            .await
            .expect("save");
    }
}

#[tokio::test]
async fn etcd_round_trip_and_two_names() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let cache = dir.file("etcd-cache.toml");
    let gpt = etcd_store(&etcd.endpoint(), "gpt", &cache)
        .await
        .expect("open gpt");
    let deepseek = etcd_store(&etcd.endpoint(), "deepseek", &cache)
        .await
        .expect("open deepseek");
    assert_eq!(loaded(&gpt).await, None);

    two_names_keep_their_own(&gpt, &deepseek).await;

    // Behind the store's back: one key per name under the prefix, holding the JSON.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let listed = client
        .get(
            ETCD_PREFIX,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("listing the prefix");
    let keys: Vec<&str> = listed
        .kvs()
        .iter()
        .map(|kv| kv.key_str().expect("utf-8 key"))
        .collect();
    assert_eq!(keys, ["/steer/configs/deepseek", "/steer/configs/gpt"]);
    let stored: SavedArgs =
        serde_json::from_slice(listed.kvs()[1].value()).expect("the value is SavedArgs JSON");
    assert_eq!(stored, args("/m/gpt-2.gguf"));

    // A corrupt value is an error naming the address and the key, not a silent default.
    client
        .put("/steer/configs/gpt", "{not json", None)
        .await
        .expect("corrupting the key");
    let err = gpt.load().await.expect_err("corrupt JSON must not load");
    let text = err.to_string();
    assert!(
        text.contains(&etcd.endpoint()) && text.contains("/steer/configs/gpt"),
        "{text}"
    );
}

#[tokio::test]
async fn unreachable_etcd_falls_back_to_the_cache_promptly() {
    // A loopback port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .to_string();
    falls_back_promptly(&addr, "nothing listens there").await;
}

#[tokio::test]
async fn silent_etcd_falls_back_to_the_cache_promptly() {
    // Connections complete in the kernel's backlog, but nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = silent.local_addr().expect("local addr").to_string();
    falls_back_promptly(&addr, "nothing answers there").await;
}

/// With etcd at `addr` not answering: a save fails within 10 s naming `addr` and the cache,
/// and a load (as after a restart) gets the cached arguments within 10 s.
async fn falls_back_promptly(addr: &str, why: &str) {
    let dir = TempDir::new();
    let cache = dir.file("etcd-cache.toml");
    let store = etcd_store(addr, "gpt", &cache)
        .await
        .expect("opening needs no etcd");
    let started = Instant::now();
    let err = store
        .save(&args("/m/a.gguf"))
        .await
        .expect_err("etcd did not confirm");
    let text = err.to_string();
    assert!(text.contains(addr), "{why}: {text}");
    assert!(text.contains(&cache.display().to_string()), "{why}: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{why}: save took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let reopened = etcd_store(addr, "gpt", &cache).await.expect("open");
    assert_eq!(loaded(&reopened).await, Some(args("/m/a.gguf")), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{why}: load took {:?}",
        started.elapsed()
    );
}

/// A save etcd does not confirm (paused: the put is sent and not answered) is written once
/// etcd answers again, so a timed-out save is never left in doubt; a store that started
/// without etcd or a cache never writes over what etcd holds.
#[tokio::test]
async fn unconfirmed_saves_reach_etcd_once_it_answers() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let cache = dir.file("etcd-cache.toml");
    let store = etcd_store(&etcd.endpoint(), "gpt", &cache)
        .await
        .expect("open");
    store.save(&args("/m/a.gguf")).await.expect("save while up");
    etcd.pause();
    let err = store
        .save(&args("/m/b.gguf"))
        .await
        .expect_err("a paused etcd does not confirm");
    assert!(
        err.to_string().contains("written to etcd once it answers"),
        "{err}"
    );
    etcd.resume();
    let other = etcd_store(&etcd.endpoint(), "gpt", &dir.file("other-cache.toml"))
        .await
        .expect("open");
    let deadline = Instant::now() + Duration::from_secs(20);
    while loaded(&other).await != Some(args("/m/b.gguf")) {
        assert!(
            Instant::now() < deadline,
            "the unconfirmed save never reached etcd"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Blind: etcd unreachable at load and nothing cached. Its save stays out of etcd's key
    // (which holds b) even once etcd answers.
    let blind_cache = dir.file("blind-cache.toml");
    let blind = etcd_store(&etcd.endpoint(), "gpt", &blind_cache)
        .await
        .expect("open");
    etcd.pause();
    assert_eq!(loaded(&blind).await, None, "etcd paused, nothing cached");
    etcd.resume();
    blind
        .save(&args("/m/c.gguf"))
        .await
        .expect("the txn answers");
    assert_eq!(
        loaded(&other).await,
        Some(args("/m/b.gguf")),
        "a blind start overwrote what etcd held"
    );
}
