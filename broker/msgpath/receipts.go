package msgpath

import (
	"github.com/chatd/chatd/broker/protocol/envelope"
	"github.com/chatd/chatd/broker/queue"
)

// receipt is a batch of messages a device of user acknowledged, by their
// Meta, whose senders are owed a delivered receipt.
type receipt struct {
	user  string
	metas [][]byte
}

// queueReceipts turns acknowledged batches into delivered receipts until
// Close, and those handed over before Close. It is the one goroutine of the path: receipts are messages, and
// queueing one may wait for a saturated committer, which must hold up
// neither delivery nor the acknowledging device's reads.
func (p *Path) queueReceipts() {
	defer close(p.done)
	for {
		select {
		case r := <-p.delivered:
			p.sendDelivered(r.user, r.metas)
		case <-p.stop:
			// Delivery is closed: queue what it handed over already, as
			// the store finishes what it accepted before it closes.
			for {
				select {
				case r := <-p.delivered:
					p.sendDelivered(r.user, r.metas)
				default:
					return
				}
			}
		}
	}
}

// sendDelivered queues delivered receipts to the senders of messages a
// device of user acknowledged, one receipt per sender with all its ids.
// Receipts carry no Meta, so they never cause receipts themselves.
func (p *Path) sendDelivered(user string, metas [][]byte) {
	var senders []string
	ids := make(map[string][]string)
	for _, m := range metas {
		from, _, id, ok := envelope.ParseMeta(m)
		if !ok {
			continue
		}
		if _, server := envelope.SenderName(from); server {
			// A backend's message: its sender has no inbox.
			continue
		}
		if _, seen := ids[from]; !seen {
			senders = append(senders, from)
		}
		ids[from] = append(ids[from], id)
	}
	ts := p.now().UnixMilli()
	for _, from := range senders {
		p.store.Append(&queue.Request{
			To:       from,
			Data:     envelope.Receipt("delivered", user, ids[from], ts),
			OnStored: p.notify,
			Done: func(st queue.Status, _ queue.Message, err error) {
				if st == queue.Failed || st == queue.Full {
					p.log.Warn("delivered receipt not queued", "to", from, "status", st, "error", err)
				}
			},
		})
	}
}
