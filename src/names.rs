//! The names of credentials and providers. They end up in file paths (a
//! sink's `{name}`), socket routes and URLs, so one check decides what a
//! name may be, for the config, the socket and the command line alike.

/// Credential and provider names end up in file paths and URLs: keep them to
/// a safe alphabet so `{name}` can never climb out of a sink directory.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("must not start with '.' or '-'".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        return Err("may hold only letters, digits, '-', '_', '.' and '@'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("sales-bot_1@eu").is_ok());
        assert!(check_name("../etc").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
    }
}
