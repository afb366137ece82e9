// Package loadtest drives a chatd server, or any MQTT broker in plain
// mode, with many simulated phones over real MQTT connections (MQTT 3.1.1
// or 5, QoS 1, persistent sessions) and reports what their users would feel.
//
// Every message carries its run tag, a run-wide sequence number, its send
// time and a per sender->receiver sequence number (and, with several
// devices per user, its number among its device's sends), so the Ledger
// can tell for each one whether it was PUBACKed, delivered, delivered
// twice, out of order, to the wrong user, or lost: PUBACKed and still not
// delivered when the grace period ends. PUBACKs are read from the
// client's session store rather than from publish tokens, which paho
// completes early when it resends after a reconnection.
//
// The scenarios (chat, drain, connect, flaky, crash, restart, workload) are described by
// Scenarios; Run executes one and returns a Report, which renders as a
// table, JSON or a self-contained HTML page.
//
// In the chat, flaky and crash scenarios each user may have several
// devices (Config.Devices, --devices N): N connections with client IDs
// {user}/d0 ... {user}/d{N-1} (with one device, the client ID is the user
// ID). All are connected before anything is sent; each message goes out
// from one of its sender's devices, drawn with the run's seed (--seed,
// shown in the report), and must then reach every device of its
// recipient once, in the order its sending device sent them, while its
// sent copy (PROTOCOL.md section 4, chatd only) must reach every other
// device of its sender once, in the order that device sent them. The
// report counts the copies expected, received, lost, duplicated,
// misrouted and out of order, and the run fails on a copy lost, misrouted
// or out of order as on a message. The Ledger's bookkeeping stays a fixed
// 32 bytes per message whatever the number of devices: one bit per
// recipient device and per device of the sender (so at most MaxDevices).
//
// The workload scenario plays a chat app's day from a workload file
// (package workload): users in sessions, acting from a weighted mix of
// direct and group messages, read receipts, typing and media uploads. Its
// accounting, the book, owes each PUBACKed message to each recipient and
// each read receipt to its sender, and reports every figure per action
// (WorkloadResult); docs/workloads.md describes it.
//
// The phones speak MQTT 3.1.1 (paho.mqtt.golang) or MQTT 5 (paho.golang),
// all one (Config.Protocol) or each version its share (Config.ProtocolMix),
// behind one transport interface with the same guarantees: a persistent
// session, reconnection over the broker list, the inbox subscribed on
// every connection, the PUBACK of each message timed when it is read even
// after a resend, and no message of a pair overtaking an earlier one
// across a reconnection. The MQTT 5 phones' session state resends its
// stored publishes, in order, while the next CONNACK is handled, before
// any new publish can go out; a PUBACK refusal counts the message as
// refused, and the report counts every reason code the broker answered
// with other than success, by packet and code.
//
// A cluster is driven through one broker URL per node: the clients are
// spread evenly over them, and paho's auto-reconnect moves a client whose
// node dies to the next URL of its list. With one server command per node
// the crash scenario kills the nodes one at a time and measures how long
// the killed node's clients take to be connected again.
//
// A chat run can be spread over several machines: each runs an Agent
// (loadtest agent), an HTTP server that carries out one run at a time,
// and RunAgents, the coordinator, gives each its own share of the users
// and of the rate (see splitConfig), so that every message stays within
// one agent's share. Each answers with its report and, since the
// coordinator sets Config.Raw, the raw data it was computed from: HDR
// histograms in HdrHistogram's compressed encoding, one per latency and
// one per second of the series. MergeReports sums the counts and
// recomputes every percentile from the merged histograms, never from the
// agents' percentiles. The token secret and password never cross the
// network: each agent has its own.
package loadtest
