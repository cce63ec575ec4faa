//! Tenants of one instance (SPEC §14) in one database, kept apart by tree:
//! the first tenant (the config's `server_name`) owns the unprefixed trees,
//! so a data dir made before tenants opens unchanged; every other tenant
//! gets the same trees named `tenant/<server_name>/<tree>`. A [`Store`] is
//! one tenant's view: its typed functions only ever reach its own trees,
//! so no query can read another tenant's rows. The tenants themselves are
//! listed in the `tenants` tree, outside every tenant.

use serde::{Deserialize, Serialize};

use crate::error::{Code, Error, Result};
use crate::ids::ServerName;

use super::{codec, Store, TREE_NAMES};

/// The registry tree: server_name → [`TenantRecord`].
const REGISTRY: &str = "tenants";

/// One tenant besides the first, as the registry keeps it. (Its
/// federation switch is in its own `meta`, as the first tenant's is.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub created_at_ms: i64,
    /// Its certificate and key, `tenant create --cert/--key` (absolute
    /// paths, read on every start so a renewed file is picked up); none
    /// means the local CA issued one.
    pub certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Store {
    /// The view of tenant `server_name` on this database (the trees are
    /// created on first use). Flushes and the durability counters are the
    /// database's, so they are shared with every other tenant's view.
    pub fn tenant(&self, server_name: &ServerName) -> Result<Store> {
        let trees = TREE_NAMES
            .iter()
            .map(|n| self.db.open_tree(format!("tenant/{server_name}/{n}")))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| self.sled_err(e))?;
        Ok(Store {
            db: self.db.clone(),
            trees,
            commits: self.commits.clone(),
            metrics: None,
            disk: self.disk.clone(),
            flusher: self.flusher.clone(),
        })
    }

    /// Every registered tenant besides the first, by server_name.
    pub fn tenants(&self) -> Result<Vec<(ServerName, TenantRecord)>> {
        let registry = self.db.open_tree(REGISTRY).map_err(|e| self.sled_err(e))?;
        let mut out = Vec::new();
        for item in registry.iter() {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let name = ServerName::parse(&String::from_utf8_lossy(&k))?;
            out.push((name, codec::decode(&v)?));
        }
        Ok(out)
    }

    /// Register a new tenant, durably; refused if it exists already.
    pub fn add_tenant(&self, server_name: &ServerName, rec: &TenantRecord) -> Result<()> {
        let registry = self.db.open_tree(REGISTRY).map_err(|e| self.sled_err(e))?;
        let added = registry
            .compare_and_swap(
                server_name.as_str().as_bytes(),
                None as Option<&[u8]>,
                Some(codec::encode(rec)?),
            )
            .map_err(|e| self.sled_err(e))?;
        if added.is_err() {
            return Err(Error::new(
                Code::Conflict,
                format!("tenant {server_name} exists already; `admin tenant list` shows them"),
            ));
        }
        self.flush_blocking()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{PeerRecord, WriteSet, T};

    #[test]
    fn a_tenant_reads_only_its_own_rows() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let x = first.tenant(&ServerName::parse("x.test").unwrap()).unwrap();
        let y = first.tenant(&ServerName::parse("y.test").unwrap()).unwrap();
        let mut w = WriteSet::default();
        w.put(T::Peers, b"z.test".to_vec(), &PeerRecord::default())
            .unwrap();
        x.commit(&w).unwrap();
        assert!(x.contains(T::Peers, b"z.test").unwrap());
        for other in [&first, &y] {
            assert!(!other.contains(T::Peers, b"z.test").unwrap());
            assert_eq!(other.scan::<PeerRecord>(T::Peers, b"").unwrap(), vec![]);
        }
        // One database: a flush by any view covers every tenant's commits.
        assert!(!x.reads_are_durable());
        first.flush_blocking().unwrap();
        assert!(x.reads_are_durable());
    }

    #[test]
    fn tenants_are_registered_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let y = ServerName::parse("y.test:8448").unwrap();
        let rec = TenantRecord {
            created_at_ms: 5,
            certificate: Some(("/etc/scaiwave/y.pem".into(), "/etc/scaiwave/y.key".into())),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.tenants().unwrap(), vec![]);
            store.add_tenant(&y, &rec).unwrap();
            let again = store.add_tenant(&y, &rec).unwrap_err();
            assert_eq!(again.code, Code::Conflict);
            let mut w = WriteSet::default();
            w.put(T::Peers, b"z.test".to_vec(), &PeerRecord::default())
                .unwrap();
            store.tenant(&y).unwrap().commit(&w).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tenants().unwrap(), vec![(y.clone(), rec)]);
        assert!(store
            .tenant(&y)
            .unwrap()
            .contains(T::Peers, b"z.test")
            .unwrap());
        assert!(!store.contains(T::Peers, b"z.test").unwrap());
    }
}
