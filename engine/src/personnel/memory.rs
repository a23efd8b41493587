//! A [`UserDirectory`] in memory: users given explicitly (unit tests), or derived on demand from
//! the seeded simulator with a generated avatar each (the demo).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::{MaskedCard, PersonnelError, UserDetails, UserDirectory};
use crate::images::{self, ImageKind, ImageRef, MemoryImageStore, avatar};
use crate::source::generator::{GeneratorConfig, Simulator};

/// Users in a map, optionally backed by the simulator.
#[derive(Debug)]
pub struct MemoryDirectory {
    /// Users looked at or changed so far (for the simulator-backed directory), or all users.
    users: Mutex<BTreeMap<u64, UserDetails>>,
    /// Users not in the map come from here, with their avatar put into `avatars`.
    simulator: Option<(Simulator, u64, MemoryImageStore)>,
}

impl MemoryDirectory {
    /// A directory of exactly these users.
    pub fn new(users: impl IntoIterator<Item = UserDetails>) -> MemoryDirectory {
        MemoryDirectory {
            users: Mutex::new(users.into_iter().map(|u| (u.user_id, u)).collect()),
            simulator: None,
        }
    }

    /// Users `1..=users` as the simulator with `seed` (and otherwise default settings, like the
    /// demo's) describes them; each starts with the avatar [`avatar::avatar_png`] gives it,
    /// stored in `avatars` when the user is first looked at.
    pub fn from_simulator(users: u64, seed: u64, avatars: MemoryImageStore) -> MemoryDirectory {
        let config = GeneratorConfig {
            seed,
            users: users.max(1),
            ..GeneratorConfig::default()
        };
        let simulator = Simulator::new(config).ok();
        if simulator.is_none() {
            tracing::warn!(
                users,
                seed,
                "The demo directory could not build its simulator; it has no users."
            );
        }
        MemoryDirectory {
            users: Mutex::new(BTreeMap::new()),
            simulator: simulator.map(|s| (s, seed, avatars)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, UserDetails>> {
        self.users.lock()
    }

    /// The user from the map, or from the simulator (then remembered).
    fn get(&self, user_id: u64) -> Option<UserDetails> {
        if let Some(user) = self.lock().get(&user_id) {
            return Some(user.clone());
        }
        let (simulator, seed, avatars) = self.simulator.as_ref()?;
        let profile = simulator.user(user_id)?;
        let png = avatar::avatar_png(*seed, user_id);
        let image = ImageRef {
            sha256: images::sha256_hex(&png),
            content_type: ImageKind::Png.content_type().to_string(),
            size: png.len() as u64,
        };
        avatars.insert(&image.sha256, Bytes::from(png));
        let details = UserDetails {
            user_id,
            name: profile.name,
            email: profile.email,
            country: profile.country,
            currency: profile.currency,
            monthly_budget_minor: profile.monthly_budget_minor,
            cards: profile
                .cards
                .iter()
                .map(|c| MaskedCard::from_card_id(c))
                .collect(),
            image: Some(image),
        };
        // Another task may have changed it meanwhile; theirs wins.
        Some(self.lock().entry(user_id).or_insert(details).clone())
    }
}

#[async_trait::async_trait]
impl UserDirectory for MemoryDirectory {
    async fn user(&self, user_id: u64) -> Result<Option<UserDetails>, PersonnelError> {
        Ok(self.get(user_id))
    }

    async fn set_image(
        &self,
        user_id: u64,
        image: Option<&ImageRef>,
    ) -> Result<Option<ImageRef>, PersonnelError> {
        if self.get(user_id).is_none() {
            return Err(PersonnelError::NotFound(format!(
                "user {user_id} does not exist"
            )));
        }
        let mut users = self.lock();
        let user = users
            .get_mut(&user_id)
            .ok_or_else(|| PersonnelError::NotFound(format!("user {user_id} does not exist")))?;
        Ok(std::mem::replace(&mut user.image, image.cloned()))
    }

    async fn referenced_images(&self) -> Result<HashSet<String>, PersonnelError> {
        // Users of a simulator-backed directory not looked at yet reference their avatar, which
        // is not stored until then either.
        Ok(self
            .lock()
            .values()
            .filter_map(|u| u.image.as_ref().map(|i| i.sha256.clone()))
            .collect())
    }
}
