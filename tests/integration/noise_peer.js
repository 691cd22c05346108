// A Noise peer for tests/integration/test_noise_interop_node.py, built on the npm package
// `noise-protocol` (emilbayes; Noise_*_25519_ChaChaPoly_BLAKE2b over libsodium, no psk).
// Reads one JSON command per line on stdin and answers one JSON line on stdout:
//   {"op": "init", "id", "pattern", "initiator", "prologue", "s_sk"?, "s_pk"?, "rs"?}
//   {"op": "write", "id", "data"} -> {"data", "done"}     handshake message out
//   {"op": "read", "id", "data"}  -> {"data", "done"}     payload of a handshake message in
//   {"op": "hash", "id"}          -> {"data"}             handshake hash, once done
//   {"op": "encrypt"|"decrypt", "id", "data", "ad"} -> {"data"}
//   {"op": "rekey_tx"|"rekey_rx", "id"} -> {}
// All bytes are hex. Any failure answers {"error": "..."}; the process keeps going.
//
// Two quirks of noise-protocol 3.0.2 are worked around here and in the test:
// * its split hands {tx: c1, rx: c2} to whichever side wrote the last handshake message, so in
//   the two-message patterns (NN, NK, NX, KN, KK, KX, IN, IK, IX) its initiator sends with c2,
//   against spec section 5.2 Split() ("c1 for initiator to responder"); two noise-protocol peers
//   agree with each other but not with any other implementation. We re-pair by role below.
// * initialize() demands a static key pair from *both* roles whenever the initiator sends "s"
//   (XN, IN responders have none); the test passes an unused one.
'use strict'

const readline = require('readline')
const noise = require('noise-protocol')
const dh = require('noise-protocol/dh')()
const hash = require('noise-protocol/hash')({ dh })
const cipher = require('noise-protocol/cipher')()
const cipherState = require('noise-protocol/cipher-state')({ cipher })
const symmetricState = require('noise-protocol/symmetric-state')({ hash, cipherState })

const MACLEN = 16
const sessions = new Map()
const hex = (s) => Buffer.from(s || '', 'hex')

function handle (cmd) {
  if (cmd.op === 'init') {
    const s = cmd.s_sk ? { secretKey: hex(cmd.s_sk), publicKey: hex(cmd.s_pk) } : null
    const rs = cmd.rs ? hex(cmd.rs) : null
    const state = noise.initialize(cmd.pattern, cmd.initiator, hex(cmd.prologue), s, null, rs, null)
    sessions.set(cmd.id, { state, initiator: cmd.initiator, split: null, hash: null })
    return {}
  }
  const session = sessions.get(cmd.id)
  if (!session) throw new Error('no session ' + cmd.id)
  const finish = (split, wroteLast) => {
    if (!split) return false
    const c1 = wroteLast ? split.tx : split.rx // see the first quirk above
    const c2 = wroteLast ? split.rx : split.tx
    session.split = session.initiator ? { tx: c1, rx: c2 } : { tx: c2, rx: c1 }
    const h = Buffer.alloc(64)
    symmetricState.getHandshakeHash(session.state.symmetricState, h)
    session.hash = h
    noise.destroy(session.state)
    return true
  }
  switch (cmd.op) {
    case 'write': {
      const payload = hex(cmd.data)
      const out = Buffer.alloc(payload.length + 2 * 32 + 3 * MACLEN)
      const done = finish(noise.writeMessage(session.state, payload, out), true)
      return { data: out.subarray(0, noise.writeMessage.bytes).toString('hex'), done }
    }
    case 'read': {
      const message = hex(cmd.data)
      const out = Buffer.alloc(message.length)
      const done = finish(noise.readMessage(session.state, message, out), false)
      return { data: out.subarray(0, noise.readMessage.bytes).toString('hex'), done }
    }
    case 'hash':
      return { data: session.hash.toString('hex') }
    case 'encrypt': {
      const plaintext = hex(cmd.data)
      const out = Buffer.alloc(plaintext.length + MACLEN)
      cipherState.encryptWithAd(session.split.tx, out, hex(cmd.ad), plaintext)
      return { data: out.subarray(0, cipherState.encryptWithAd.bytesWritten).toString('hex') }
    }
    case 'decrypt': {
      const ciphertext = hex(cmd.data)
      const out = Buffer.alloc(Math.max(ciphertext.length - MACLEN, 0))
      cipherState.decryptWithAd(session.split.rx, out, hex(cmd.ad), ciphertext)
      return { data: out.subarray(0, cipherState.decryptWithAd.bytesWritten).toString('hex') }
    }
    case 'rekey_tx':
      cipherState.rekey(session.split.tx)
      return {}
    case 'rekey_rx':
      cipherState.rekey(session.split.rx)
      return {}
    default:
      throw new Error('unknown op ' + cmd.op)
  }
}

const rl = readline.createInterface({ input: process.stdin, terminal: false })
rl.on('line', (line) => {
  let reply
  try {
    reply = handle(JSON.parse(line))
  } catch (err) {
    reply = { error: String(err && err.message ? err.message : err) || 'error' }
  }
  process.stdout.write(JSON.stringify(reply) + '\n')
})
