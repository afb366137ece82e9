// Package loadtest drives a chatd server, or any MQTT broker in plain
// mode, with many simulated phones over real MQTT connections (paho, QoS 1,
// persistent sessions) and reports what their users would feel.
//
// Every message carries its run tag, a run-wide sequence number, its send
// time and a per sender->receiver sequence number, so the Ledger can tell
// for each one whether it was PUBACKed, delivered, delivered twice, out of
// order, to the wrong user, or lost: PUBACKed and still not delivered when
// the grace period ends. PUBACKs are read from the client's session store
// rather than from publish tokens, which paho completes early when it
// resends after a reconnection.
//
// The scenarios (chat, drain, connect, flaky, crash, restart) are described by
// Scenarios; Run executes one and returns a Report, which renders as a
// table, JSON or a self-contained HTML page.
//
// A cluster is driven through one broker URL per node: the clients are
// spread evenly over them, and paho's auto-reconnect moves a client whose
// node dies to the next URL of its list. With one server command per node
// the crash scenario kills the nodes one at a time and measures how long
// the killed node's clients take to be connected again.
package loadtest
