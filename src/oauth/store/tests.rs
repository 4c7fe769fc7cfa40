use super::*;
use crate::private_file::create_private_dir;

#[tokio::test]
async fn save_replaces_atomically_with_private_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::new(dir.path());
    let mut grant = StoredGrant {
        account: "a@b.c".into(),
        refresh_token: Some(Secret::new("rt1".into())),
        ..Default::default()
    };
    store.save("a@b.c", &grant).await.unwrap();
    grant.refresh_token = Some(Secret::new("rt2".into()));
    store.save("A@B.C", &grant).await.unwrap();
    let loaded = store.load("a@b.c").await.unwrap().unwrap();
    assert_eq!(loaded.refresh_token.unwrap().expose(), "rt2");
    let names: Vec<_> = std::fs::read_dir(store.file().unwrap().dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["a@b.c.json".to_string()],
        "no temporary files left"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.file().unwrap().path("a@b.c"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn usernames_cannot_escape_the_folder() {
    let store = TokenStore::new(Path::new("/state"));
    assert_eq!(
        store.file().unwrap().path("../x/y").parent().unwrap(),
        Path::new("/state/tokens")
    );
    assert_eq!(
        store
            .file()
            .unwrap()
            .path("../x/y")
            .file_name()
            .unwrap()
            .to_str()
            .unwrap(),
        "%2E.%2Fx%2Fy.json"
    );
}

#[tokio::test]
async fn missing_file_is_no_grant_and_damaged_file_says_login() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::new(dir.path());
    assert!(store.load("x").await.unwrap().is_none());
    create_private_dir(store.file().unwrap().dir()).unwrap();
    std::fs::write(store.file().unwrap().path("x"), b"{not json").unwrap();
    let e = store.load("x").await.unwrap_err();
    assert!(matches!(e, LoadError::Damaged(_)), "{e:?}");
    assert!(e.to_string().contains("xoauth2-proxy login x"), "{e}");
    store.save("x", &grant("x", "rt")).await.unwrap();
    assert!(
        store.load("x").await.unwrap().is_some(),
        "login replaces it"
    );
}

fn grant(account: &str, refresh_token: &str) -> StoredGrant {
    StoredGrant {
        account: account.into(),
        flow: Some(Flow::DeviceCode),
        refresh_token: Some(Secret::new(refresh_token.into())),
        access_token: Some(Secret::new(format!("{refresh_token}-access"))),
        ..Default::default()
    }
}

/// A store under `dir` sealed with the key file `name` (made if missing).
fn sealed_store(dir: &Path, name: &str) -> TokenStore {
    let file = dir.join(name);
    if !file.exists() {
        crate::sealing::write_key_file(&file).unwrap();
    }
    TokenStore::new(&dir.join("state")).with_key(TokenKey::read(&file).unwrap())
}

#[tokio::test]
async fn a_sealed_grant_round_trips_and_its_file_holds_no_token_text() {
    let dir = tempfile::tempdir().unwrap();
    let store = sealed_store(dir.path(), "key");
    store
        .save(
            "Sales@Contoso.com",
            &grant("sales@contoso.com", "rt-SECRET-1"),
        )
        .await
        .unwrap();
    let file = store.read("sales@contoso.com").await.unwrap().unwrap();
    assert!(file.sealed);
    assert_eq!(file.grant.refresh_token.unwrap().expose(), "rt-SECRET-1");
    assert_eq!(file.grant.account, "sales@contoso.com");
    let text = std::fs::read_to_string(store.file().unwrap().path("sales@contoso.com")).unwrap();
    for clear in ["rt-SECRET-1", "access", "refresh_token", "contoso"] {
        assert!(!text.contains(clear), "{clear} in {text}");
    }
    let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(envelope["sealed"], 1);
}

#[tokio::test]
async fn swapped_sealed_files_do_not_open_and_stay_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let store = sealed_store(dir.path(), "key");
    store
        .save("a@x.com", &grant("a@x.com", "rt-a"))
        .await
        .unwrap();
    store
        .save("b@x.com", &grant("b@x.com", "rt-b"))
        .await
        .unwrap();
    let (a, b) = (
        store.file().unwrap().path("a@x.com"),
        store.file().unwrap().path("b@x.com"),
    );
    let swap = dir.path().join("swap");
    std::fs::rename(&a, &swap).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&swap, &b).unwrap();
    let (bytes_a, bytes_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    for (user, path) in [("a@x.com", &a), ("b@x.com", &b)] {
        let e = store.load(user).await.unwrap_err();
        assert!(matches!(e, LoadError::Sealed(_)), "{e:?}");
        assert!(
            e.to_string().contains("or the file is another account's"),
            "{e}"
        );
        let refused = store.save(user, &grant(user, "rt-new")).await.unwrap_err();
        assert!(refused.contains("is not saved"), "{refused}");
        assert!(refused.contains(&path.display().to_string()), "{refused}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), bytes_a);
    assert_eq!(std::fs::read(&b).unwrap(), bytes_b);
}

#[tokio::test]
async fn a_wrong_key_leaves_the_file_intact_and_the_right_key_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let right = sealed_store(dir.path(), "right");
    right
        .save("a@x.com", &grant("a@x.com", "rt-a"))
        .await
        .unwrap();
    let path = right.file().unwrap().path("a@x.com");
    let before = std::fs::read(&path).unwrap();

    let wrong = sealed_store(dir.path(), "wrong");
    let e = wrong.load("a@x.com").await.unwrap_err();
    assert!(matches!(e, LoadError::Sealed(_)), "{e:?}");
    let wrong_key = dir.path().join("wrong").display().to_string();
    assert!(
        e.to_string()
            .contains(&format!("does not open with the token key in {wrong_key}")),
        "{e}"
    );
    assert!(
        wrong
            .save("a@x.com", &grant("a@x.com", "rt-x"))
            .await
            .is_err()
    );
    let unsealed = TokenStore::new(&dir.path().join("state"));
    let e = unsealed.load("a@x.com").await.unwrap_err();
    assert!(e.to_string().contains("no token key is configured"), "{e}");
    assert!(
        unsealed
            .save("a@x.com", &grant("a@x.com", "rt-x"))
            .await
            .is_err()
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let back = right.load("a@x.com").await.unwrap().unwrap();
    assert_eq!(back.refresh_token.unwrap().expose(), "rt-a");
}

#[tokio::test]
async fn a_plain_grant_is_read_and_sealed_at_its_next_save() {
    let dir = tempfile::tempdir().unwrap();
    let plain = TokenStore::new(&dir.path().join("state"));
    plain
        .save("a@x.com", &grant("a@x.com", "rt-a"))
        .await
        .unwrap();
    let sealed = sealed_store(dir.path(), "key");
    let file = sealed.read("a@x.com").await.unwrap().unwrap();
    assert!(!file.sealed);
    sealed.save("a@x.com", &file.grant).await.unwrap();
    let file = sealed.read("a@x.com").await.unwrap().unwrap();
    assert!(file.sealed);
    assert_eq!(file.grant.refresh_token.unwrap().expose(), "rt-a");
    let text = std::fs::read_to_string(sealed.file().unwrap().path("a@x.com")).unwrap();
    assert!(!text.contains("rt-a"), "{text}");
}

#[cfg(unix)]
#[tokio::test]
async fn symlinked_grant_and_lock_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::new(&dir.path().join("state"));
    store.prepare().await.unwrap();
    // A grant planted elsewhere, linked in: not read, not written through.
    let planted = dir.path().join("planted.json");
    std::fs::write(&planted, br#"{"account":"a@x.com","refresh_token":"evil"}"#).unwrap();
    std::os::unix::fs::symlink(&planted, store.file().unwrap().path("a@x.com")).unwrap();
    let e = store.load("a@x.com").await.unwrap_err();
    assert!(matches!(e, LoadError::Unsafe(_)), "{e:?}");
    assert!(e.to_string().contains("is a symbolic link"), "{e}");
    assert!(e.to_string().contains("remove it with `rm "), "{e}");
    assert!(
        store
            .save("a@x.com", &grant("a@x.com", "rt"))
            .await
            .is_err()
    );
    assert!(std::fs::read_to_string(&planted).unwrap().contains("evil"));
    // A lock file linked to a file the proxy would create (as root: anywhere).
    let target = dir.path().join("created-through-the-link");
    std::os::unix::fs::symlink(&target, store.file().unwrap().lock_path("b@x.com")).unwrap();
    let e = store.check_lock("b@x.com").unwrap_err();
    assert!(
        e.contains("lock file") && e.contains("symbolic link"),
        "{e}"
    );
    let e = store.lock("b@x.com").await.err().unwrap().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!target.exists(), "the link was not followed");
}

#[cfg(unix)]
#[tokio::test]
async fn a_folder_other_users_may_write_is_refused_with_the_chmod() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = TokenStore::new(&state);
    store.prepare().await.unwrap();
    mode(store.file().unwrap().dir(), 0o777);
    let e = store.prepare().await.unwrap_err();
    let tokens = store.file().unwrap().dir().display();
    assert!(
        e.contains(&format!("the folder of grants {tokens} can be written by users other than its owner (mode 0777); run `chmod 700 {tokens}`")),
        "{e}"
    );
    mode(store.file().unwrap().dir(), 0o700);
    mode(&state, 0o757);
    let e = store.prepare().await.unwrap_err();
    assert!(
        e.contains(&format!("run `chmod 700 {}`", state.display())),
        "{e}"
    );
    // Group-writable for a group that is not the proxy's own (if this
    // user may hand the folder to one; the rule itself is unit-tested in
    // private_file).
    mode(&state, 0o770);
    store.prepare().await.unwrap();
    if std::os::unix::fs::chown(&state, None, Some(u32::MAX - 7)).is_ok() {
        let e = store.prepare().await.unwrap_err();
        assert!(e.contains("(mode 0770)"), "{e}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_grant_file_another_user_owns_or_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::new(&dir.path().join("state"));
    store
        .save("a@x.com", &grant("a@x.com", "rt"))
        .await
        .unwrap();
    let path = store.file().unwrap().path("a@x.com");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o646)).unwrap();
    let e = store.load("a@x.com").await.unwrap_err();
    assert!(matches!(e, LoadError::Unsafe(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("run `chmod 600 {}`", path.display()))
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Owned by another user (only root may give a file away).
    if std::os::unix::fs::chown(&path, Some(u32::MAX - 7), None).is_ok() {
        let e = store.load("a@x.com").await.unwrap_err();
        assert!(e.to_string().contains("belongs to uid"), "{e}");
        assert!(
            store
                .save("a@x.com", &grant("a@x.com", "rt2"))
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn forgetting_a_grant_removes_its_file_and_none_is_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::new(dir.path());
    store
        .save("a@x.com", &grant("a@x.com", "rt"))
        .await
        .unwrap();
    store.forget("A@x.com").await.unwrap();
    assert!(!store.file().unwrap().path("a@x.com").exists());
    assert!(store.load("a@x.com").await.unwrap().is_none());
    store.forget("a@x.com").await.unwrap();
}

#[tokio::test]
async fn migrating_again_leaves_a_newer_grant_in_the_target_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let from = TokenStore::new(&dir.path().join("from"));
    let to = TokenStore::new(&dir.path().join("to"));
    from.save("a@x.com", &grant("a@x.com", "rt-first"))
        .await
        .unwrap();
    let done = migrate(&from, &to).await.unwrap();
    assert_eq!(done.copied, vec!["a@x.com".to_string()]);
    // Replicas on the target refresh the grant (its refresh token rotates);
    // a second account arrives in the source meanwhile.
    to.save("a@x.com", &grant("a@x.com", "rt-rotated"))
        .await
        .unwrap();
    from.save("b@x.com", &grant("b@x.com", "rt-b"))
        .await
        .unwrap();

    let again = migrate(&from, &to).await.unwrap();
    assert_eq!(again.left, vec!["a@x.com".to_string()]);
    assert_eq!(again.copied, vec!["b@x.com".to_string()]);
    let kept = to.load("a@x.com").await.unwrap().unwrap();
    assert_eq!(kept.refresh_token.unwrap().expose(), "rt-rotated");
}
