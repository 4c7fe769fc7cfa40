// Drives imapflow the way NocoBase's imap-smtp mail provider does, for the Rust tests.
//
//   node tests/node/imapflow_session.mjs '{"host":"127.0.0.1","port":1143,"secure":false,
//        "user":"u@example.com","pass":"pw","steps":["select","fetch","append","idle","list"]}'
//
// Arguments (one JSON object): host, port, secure (bool), user, pass | accessToken,
// caFile (PEM, for secure), steps (any of select, fetch, download, append, idle, list,
// noop), appendSize (bytes, default 2048), appendMailbox (default INBOX), fetchUid
// (default "*": the highest UID; fetch and download use UID FETCH), idleMs (default 300),
// timeoutMs (whole run, default 45000).
//
// Prints exactly one JSON line on stdout: {"ok":true, capabilities, enabled, exists, …}
// or {"ok":false, message, authenticationFailed, serverResponseCode, responseText, code}
// (exit status 1).

import { ImapFlow } from 'imapflow';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

const args = JSON.parse(process.argv[2] || '{}');
const steps = args.steps || [];
const result = { ok: true };
let printed = false;

function print(obj, code) {
    if (printed) {
        return;
    }
    printed = true;
    process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
}

function fail(err) {
    print(
        {
            ok: false,
            message: (err && err.message) || String(err),
            authenticationFailed: !!(err && err.authenticationFailed),
            serverResponseCode: (err && err.serverResponseCode) || null,
            responseStatus: (err && err.responseStatus) || null,
            responseText: (err && (err.responseText || (typeof err.response === 'string' ? err.response : null))) || null,
            response: err && typeof err.response === 'string' ? err.response : null,
            code: (err && err.code) || null,
            stepsDone: result.stepsDone || []
        },
        1
    );
}

const sha256 = buf => createHash('sha256').update(buf).digest('hex');
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// A plain-text message of exactly `size` bytes (at least the headers' length).
function makeMessage(size) {
    const head = [
        'From: Driver <driver@example.com>',
        `To: ${args.user || 'user@example.com'}`,
        `Subject: imapflow append ${Date.now()}`,
        `Message-ID: <${Date.now()}.${Math.random().toString(36).slice(2)}@example.com>`,
        `Date: ${new Date().toUTCString()}`,
        'MIME-Version: 1.0',
        'Content-Type: text/plain; charset=us-ascii',
        '',
        ''
    ].join('\r\n');
    const headBuf = Buffer.from(head);
    const bodyLen = Math.max(0, size - headBuf.length);
    const line = Buffer.from('The quick brown fox jumps over the lazy dog 0123456789 abcdefghij\r\n');
    const body = Buffer.alloc(bodyLen);
    for (let off = 0; off < bodyLen; off += line.length) {
        line.copy(body, off, 0, Math.min(line.length, bodyLen - off));
    }
    return Buffer.concat([headBuf, body]);
}

const deadline = setTimeout(() => {
    const err = new Error(`imapflow driver timed out after ${args.timeoutMs || 45000} ms`);
    err.code = 'DRIVER_TIMEOUT';
    fail(err);
}, args.timeoutMs || 45000);

async function main() {
    const auth = { user: args.user };
    if (args.accessToken) {
        auth.accessToken = args.accessToken;
    } else {
        auth.pass = args.pass;
    }
    const tls = { rejectUnauthorized: true };
    if (args.caFile) {
        tls.ca = [readFileSync(args.caFile)];
    }
    const client = new ImapFlow({
        host: args.host,
        port: args.port,
        secure: !!args.secure,
        auth,
        logger: false,
        tls,
        connectionTimeout: 15000,
        greetingTimeout: 15000,
        socketTimeout: 30000
    });
    client.on('error', err => {
        result.errorEvents = (result.errorEvents || 0) + 1;
        result.lastErrorEvent = err && err.message;
    });

    await client.connect();
    result.capabilities = [...client.capabilities.keys()];
    result.enabled = [...(client.enabled || [])];
    result.stepsDone = [];

    let lock = null;
    for (const step of steps) {
        switch (step) {
            case 'select': {
                lock = await client.getMailboxLock('INBOX');
                result.exists = client.mailbox.exists;
                result.uidValidity = Number(client.mailbox.uidValidity);
                result.uidNext = client.mailbox.uidNext;
                break;
            }
            case 'fetch': {
                // UID FETCH, as NocoBase does; "*" is the highest UID.
                const range = args.fetchUid ? String(args.fetchUid) : '*';
                const msg = await client.fetchOne(
                    range,
                    { uid: true, flags: true, size: true, internalDate: true, envelope: true, bodyStructure: true, source: true },
                    { uid: true }
                );
                if (!msg) {
                    throw new Error('fetchOne returned nothing');
                }
                result.fetched = {
                    uid: msg.uid,
                    size: msg.source.length,
                    rfc822Size: msg.size,
                    sha256: sha256(msg.source),
                    subject: msg.envelope && msg.envelope.subject,
                    from: msg.envelope && msg.envelope.from && msg.envelope.from.map(a => a.address),
                    bodyType: msg.bodyStructure && msg.bodyStructure.type,
                    flags: msg.flags ? [...msg.flags] : []
                };
                break;
            }
            case 'download': {
                const uid = args.fetchUid || (result.fetched && result.fetched.uid);
                const { content } = await client.download(String(uid || '*'), undefined, { uid: true });
                const chunks = [];
                for await (const chunk of content) {
                    chunks.push(chunk);
                }
                const buf = Buffer.concat(chunks);
                result.downloaded = { size: buf.length, sha256: sha256(buf) };
                break;
            }
            case 'append': {
                const message = makeMessage(args.appendSize || 2048);
                const res = await client.append(args.appendMailbox || 'INBOX', message, ['\\Seen']);
                result.appended = {
                    size: message.length,
                    sha256: sha256(message),
                    uid: res && res.uid,
                    uidValidity: res && res.uidValidity !== undefined ? Number(res.uidValidity) : null
                };
                break;
            }
            case 'idle': {
                if (!lock) {
                    lock = await client.getMailboxLock('INBOX');
                }
                const idling = client.idle();
                await sleep(args.idleMs || 300);
                await client.noop();
                await idling;
                result.idled = true;
                break;
            }
            case 'list': {
                const list = await client.list({ statusQuery: { messages: true, uidNext: true, unseen: true } });
                result.list = list.map(box => ({
                    path: box.path,
                    specialUse: box.specialUse || null,
                    status: box.status ? { messages: box.status.messages, uidNext: box.status.uidNext, unseen: box.status.unseen } : null
                }));
                break;
            }
            case 'noop': {
                await client.noop();
                break;
            }
            default:
                throw new Error(`unknown step ${step}`);
        }
        result.stepsDone.push(step);
    }
    if (lock) {
        lock.release();
    }
    if (client.mailbox && client.mailbox.exists !== undefined) {
        result.existsAtEnd = client.mailbox.exists;
    }
    await client.logout();
    clearTimeout(deadline);
    print(result, 0);
}

main().catch(fail);
