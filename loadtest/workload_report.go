package loadtest

import (
	"fmt"
	"io"
	"strings"

	"github.com/chatd/chatd/loadtest/workload"
)

// WorkloadResult is what the workload scenario's users did, per action.
type WorkloadResult struct {
	// Name is the workload's name.
	Name string `json:"name"`
	// Speed is how many times faster than its file the workload ran.
	Speed float64 `json:"speed"`
	// Groups is the groups created, of GroupSize members each.
	Groups    int `json:"groups"`
	GroupSize int `json:"group_size"`
	// Phases are the workload's phases, with when each ran.
	Phases []PhaseResult `json:"phases"`
	// Actions is each action's figures by name (dm, group, media, read,
	// typing), which makes them threshold figures such as
	// workload.actions.dm.lost or workload.actions.group.deliver_latency.p99_ms.
	Actions map[string]ActionResult `json:"actions"`
	// Presence is the presence notifications the users watched.
	Presence PresenceResult `json:"presence"`
	// Sessions is the users' comings and goings.
	Sessions SessionResult `json:"sessions"`
}

// PhaseResult is one phase of a workload and when it ran, in seconds from
// the start of its sending phase.
type PhaseResult struct {
	Name     string  `json:"name"`
	StartSec float64 `json:"start_s"`
	EndSec   float64 `json:"end_s"`
}

// ActionResult is what one kind of action did. For messages (dm, group,
// media) a delivery is one recipient's; for read receipts, the receipt's
// arrival at the sender of what was read; typing signals, sent at QoS 0
// to online users only, are counted but never lost.
type ActionResult struct {
	// Count is how many times users took the action.
	Count int64 `json:"count"`
	// Skipped is the actions with nothing to do (a read with nothing unread).
	Skipped int64 `json:"skipped"`
	// Failed is the actions that could not be carried out (no PUBACK, a
	// failed upload).
	Failed int64 `json:"failed"`
	// Sent is the messages or receipts published.
	Sent int64 `json:"sent"`
	// Acked is those the broker PUBACKed.
	Acked int64 `json:"acked"`
	// Refused is the messages the broker PUBACKed and then refused with an error event.
	Refused int64 `json:"refused"`
	// Expected is the deliveries owed: recipients of what was PUBACKed
	// and not refused; for typing, signals sent to online users.
	Expected int64 `json:"expected"`
	// Delivered is the first deliveries.
	Delivered int64 `json:"delivered"`
	// ToOffline is the first deliveries to recipients that were offline
	// when it was sent, which the deliver latency leaves out.
	ToOffline int64 `json:"to_offline"`
	// Received is the typing signals received.
	Received int64 `json:"received,omitempty"`
	// Duplicates is the deliveries beyond the first.
	Duplicates int64 `json:"duplicates"`
	// OrderViolations is first deliveries that came after a later
	// message of the same sender to the same recipient.
	OrderViolations int64 `json:"order_violations"`
	// Lost is the deliveries owed and never made.
	Lost int64 `json:"lost"`
	// Ack is the send->PUBACK latency.
	Ack Percentiles `json:"ack_latency"`
	// Deliver is the send->deliver latency to recipients online when it
	// was sent (read receipts: send->arrival at the sender; typing:
	// send->arrival).
	Deliver Percentiles `json:"deliver_latency"`
	// Upload is the media upload's latency (media only).
	Upload *Percentiles `json:"upload_latency,omitempty"`
}

// PresenceResult is the presence changes and the notifications watchers got.
type PresenceResult struct {
	// Changes is the users going online or offline.
	Changes int64 `json:"changes"`
	// Events is the notifications the watching users received.
	Events int64 `json:"events"`
	// Latency is from a change to a watcher's notification of it.
	Latency Percentiles `json:"latency"`
}

// SessionResult is the users' sessions.
type SessionResult struct {
	// Connects is the sessions opened.
	Connects int64 `json:"connects"`
	// Disconnects is the sessions ended.
	Disconnects int64 `json:"disconnects"`
	// Failed is the sessions that could not be opened.
	Failed int64 `json:"failed"`
	// Connect is CONNECT->SUBACK of each session.
	Connect Percentiles `json:"connect_latency"`
}

// writeWorkload writes the per-action table of a workload run.
func writeWorkload(w io.Writer, wl *WorkloadResult) {
	phases := make([]string, len(wl.Phases))
	for i, p := range wl.Phases {
		phases[i] = fmt.Sprintf("%s %.0f-%.0fs", p.Name, p.StartSec, p.EndSec)
	}
	fmt.Fprintf(w, "workload %q x%g: %d groups of %d; %s\n", wl.Name, wl.Speed, wl.Groups, wl.GroupSize, strings.Join(phases, ", "))
	fmt.Fprintf(w, "action\tcount\tfailed\tsent\tacked\tdelivered/owed\tto offline\tlost\tdup\torder\tack p50/p99 ms\tdeliver p50/p99 ms\n")
	for _, name := range workload.ActionNames {
		a, ok := wl.Actions[name]
		if !ok {
			continue
		}
		delivered := fmt.Sprintf("%d/%d", a.Delivered, a.Expected)
		if name == workload.Typing {
			delivered = fmt.Sprintf("%d/%d", a.Received, a.Expected)
		}
		count := fmt.Sprint(a.Count)
		if a.Skipped > 0 {
			count += fmt.Sprintf(" (%d idle)", a.Skipped)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%s\t%d\t%d\t%d\t%d\t%s\t%s\n", name, count, a.Failed, a.Sent, a.Acked, delivered,
			a.ToOffline, a.Lost, a.Duplicates, a.OrderViolations, p50p99(a.Ack), p50p99(a.Deliver))
	}
	fmt.Fprintln(w)
	if m, ok := wl.Actions[workload.Media]; ok && m.Upload != nil && m.Upload.Count > 0 {
		fmt.Fprintf(w, "media uploads\t%d, p50 %.1f ms, p99 %.1f ms\n", m.Upload.Count, m.Upload.P50, m.Upload.P99)
	}
	fmt.Fprintf(w, "sessions\t%d opened, %d ended, %d failed; CONNECT->SUBACK p50 %.1f ms, p99 %.1f ms\n",
		wl.Sessions.Connects, wl.Sessions.Disconnects, wl.Sessions.Failed, wl.Sessions.Connect.P50, wl.Sessions.Connect.P99)
	fmt.Fprintf(w, "presence\t%d changes, %d notifications seen; change->seen p50 %.1f ms, p99 %.1f ms\n",
		wl.Presence.Changes, wl.Presence.Events, wl.Presence.Latency.P50, wl.Presence.Latency.P99)
}

// workloadReport puts the workload scenario's accounting into rep: the
// message counts and latencies of every action together, and each
// action's own.
func (r *run) workloadReport(rep *Report) {
	actions, presence, sessions, counts, refusals := r.book.result()
	rep.Counts = counts
	rep.RefusalCodes = refusals
	if len(refusals) == 0 {
		rep.RefusalCodes = nil
	}
	rep.Deliver = PercentilesOf(r.book.deliverHistogram())
	rep.Ack = PercentilesOf(r.book.ackHistogram())
	rep.LatencyBins = LogBins(r.book.deliverHistogram())
	rep.Connections.Clients = int(sessions.Connects)
	rep.Connections.Connack = Percentiles{}
	rep.Connections.Suback = sessions.Connect
	if wl := r.workload; wl != nil {
		wl.Actions, wl.Presence, wl.Sessions = actions, presence, sessions
		rep.Workload = wl
	}
	rep.SendRate = float64(counts.Sent) / r.cfg.Duration.Seconds()
}

// p50p99 writes the median and 99th percentile of q, "-" without samples.
func p50p99(q Percentiles) string {
	if q.Count == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f / %.1f", q.P50, q.P99)
}
