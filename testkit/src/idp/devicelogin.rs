//! `/devicelogin`: where a person enters the device code, as at
//! microsoft.com/devicelogin, for browser tests of the device code flow
//! ([`DeviceOutcome::ApproveInBrowser`]). Entering a pending code approves
//! it as the device user.

use std::sync::Arc;

use hyper::Method;

use super::http::{Request, Response};
use super::{DeviceOutcome, Shared};

pub(super) fn page(shared: &Arc<Shared>, request: &Request) -> Response {
    match request.method {
        Method::GET => form(""),
        Method::POST => enter(shared, request.form().get("code").map(String::as_str)),
        _ => Response::method_not_allowed(),
    }
}

fn form(notice: &str) -> Response {
    Response::html(
        200,
        &format!(
            "<!doctype html><html lang=\"en\"><head><title>Enter code</title></head><body>\
             <h1>Enter code</h1><p>{notice}</p>\
             <form method=\"post\" action=\"/devicelogin\">\
             <label for=\"code\">Code</label> <input id=\"code\" name=\"code\" autocomplete=\"off\">\
             <button id=\"next\" type=\"submit\">Next</button></form></body></html>"
        ),
    )
}

fn enter(shared: &Arc<Shared>, code: Option<&str>) -> Response {
    let code = code.unwrap_or_default().trim().to_uppercase();
    let mut inner = shared.inner.lock().unwrap();
    if inner.device_outcome != DeviceOutcome::ApproveInBrowser {
        return form("Codes are approved without this page in this test.");
    }
    let device = inner
        .devices
        .values_mut()
        .find(|d| !code.is_empty() && d.user_code == code);
    match device {
        Some(device) => {
            device.approved = true;
            Response::html(
                200,
                "<!doctype html><html lang=\"en\"><head><title>Signed in</title></head><body>\
                 <h1 id=\"approved\">You have signed in</h1>\
                 <p>You may now close this window.</p></body></html>",
            )
        }
        None => form("That code was not recognised. Check it and try again."),
    }
}
