//! Entra (Azure AD) error codes turned into what the user should do.
//!
//! Microsoft puts a code in every error description (`AADSTS70000: The
//! provided value…`). The code decides two things: whether the grant is gone
//! (the account needs `login` again), the app registration is misconfigured, or
//! the failure is passing; and which sentence tells the user what to fix.

/// What an identity-provider error means for the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The grant is missing, expired or revoked: run `login` again.
    GrantInvalid,
    /// The app registration or tenant refuses us: fix it in Entra.
    AppRefused,
    /// Try again later; keep the grant.
    Transient,
}

/// The `AADSTSnnnn` code in an error description, if any.
pub fn code_in(description: &str) -> Option<u32> {
    let at = description.find("AADSTS")? + "AADSTS".len();
    let digits: String = description[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Classifies an OAuth error (`error` field plus optional AADSTS code).
pub fn classify(error: &str, code: Option<u32>) -> ErrorClass {
    match code {
        Some(70000 | 70008 | 700082 | 50173 | 50076 | 50078 | 50079 | 700084 | 50133 | 54005) => {
            return ErrorClass::GrantInvalid;
        }
        Some(
            65001 | 700016 | 7000215 | 7000222 | 7000218 | 700025 | 50011 | 700022 | 70011 | 90002
            | 900023 | 50020 | 50034 | 50057 | 53003 | 500011,
        ) => return ErrorClass::AppRefused,
        Some(_) | None => {}
    }
    match error {
        "invalid_grant" | "interaction_required" | "expired_token" | "authorization_declined" => {
            ErrorClass::GrantInvalid
        }
        "invalid_client"
        | "unauthorized_client"
        | "invalid_scope"
        | "invalid_request"
        | "consent_required"
        | "access_denied" => ErrorClass::AppRefused,
        _ => ErrorClass::Transient,
    }
}

/// A sentence saying what to fix for a known code.
pub fn fix_it(code: u32) -> Option<&'static str> {
    Some(match code {
        50076 | 50078 | 50079 => {
            "the tenant now requires multi-factor authentication for this user: run `xoauth2-proxy login ACCOUNT` and complete MFA"
        }
        65001 => {
            "the app has no consent for these permissions: grant admin consent under Entra > App registrations > API permissions (IMAP.AccessAsUser.All, SMTP.Send, offline_access)"
        }
        700016 => {
            "no app with this client_id exists in the tenant: check `client_id` and `tenant`, or that the app is multi-tenant"
        }
        7000215 => {
            "the client secret is wrong: use the secret's Value, not its Secret ID (Entra > App registrations > Certificates & secrets)"
        }
        7000222 => {
            "the client secret has expired: create a new one under Entra > App registrations > Certificates & secrets and update the config"
        }
        7000218 => {
            "the app expects a client secret: set `client_secret`, or enable 'Allow public client flows' under Entra > App registrations > Authentication"
        }
        700025 => {
            "the app is a public client and must not send a secret: remove `client_secret`, or turn off 'Allow public client flows'"
        }
        70000 | 70008 | 700082 | 50173 | 700084 | 50133 | 54005 => {
            "the grant is invalid, expired or revoked: run `xoauth2-proxy login ACCOUNT`"
        }
        50011 => {
            "the redirect URI does not match the app registration: add `redirect_uri` under Entra > App registrations > Authentication"
        }
        700022 | 70011 => {
            "the requested scopes are invalid or mix resources: use only https://outlook.office.com/… scopes plus offline_access (no Graph scopes such as User.Read)"
        }
        90002 | 900023 => {
            "the tenant is not found: check `tenant` (a tenant ID, a verified domain, or organizations)"
        }
        50020 | 500011 => {
            "the account or resource is not in this tenant: check `tenant`, and that Exchange Online is licensed for the mailbox"
        }
        50034 => "the user account does not exist in this tenant",
        50057 => "the user account is disabled in Entra",
        53003 => {
            "a Conditional Access policy blocked the sign-in: ask the tenant admin to allow this app"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_code_in_a_description() {
        assert_eq!(
            code_in("AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"),
            Some(7000215)
        );
        assert_eq!(code_in("no code here"), None);
    }

    #[test]
    fn revoked_grants_need_login_and_bad_secrets_are_app_errors() {
        assert_eq!(
            classify("invalid_grant", Some(70000)),
            ErrorClass::GrantInvalid
        );
        assert_eq!(
            classify("invalid_grant", Some(50076)),
            ErrorClass::GrantInvalid
        );
        assert_eq!(
            classify("invalid_client", Some(7000215)),
            ErrorClass::AppRefused
        );
        assert_eq!(
            classify("temporarily_unavailable", None),
            ErrorClass::Transient
        );
        assert!(fix_it(7000215).unwrap().contains("Secret ID"));
        assert!(fix_it(65001).unwrap().contains("consent"));
    }
}
