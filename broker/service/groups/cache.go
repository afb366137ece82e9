package groups

import "container/list"

// cache holds the groups used last, bounded by the members they have
// rather than by their number: a group of a thousand members takes a
// thousand times the memory of a group of one. It is not safe for
// concurrent use; the Store guards it.
type cache struct {
	// limit is the most weight held; used is the weight held.
	limit, used int
	// order has the most recently used item first; items finds them.
	order *list.List
	items map[string]*list.Element
}

// cacheItem is one group's entry and what it weighs.
type cacheItem struct {
	gid    string
	e      entry
	weight int
}

func newCache(limit int) *cache {
	return &cache{limit: limit, order: list.New(), items: make(map[string]*list.Element)}
}

// weight is what e counts against the limit: its members and one more,
// so that empty groups and deletions count too.
func weight(e entry) int {
	if e.g == nil {
		return 1
	}
	return 1 + len(e.g.Members)
}

// get returns gid's entry, if held, and marks it used.
func (c *cache) get(gid string) (entry, bool) {
	el, ok := c.items[gid]
	if !ok {
		return entry{}, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*cacheItem).e, true
}

// put holds e for gid, replacing what was held, and drops the least
// recently used entries beyond the limit. An entry heavier than the whole
// limit is not held at all.
func (c *cache) put(gid string, e entry) {
	c.remove(gid)
	w := weight(e)
	if w > c.limit {
		return
	}
	c.items[gid] = c.order.PushFront(&cacheItem{gid: gid, e: e, weight: w})
	c.used += w
	for c.used > c.limit {
		c.remove(c.order.Back().Value.(*cacheItem).gid)
	}
}

// remove drops gid's entry, if held.
func (c *cache) remove(gid string) {
	el, ok := c.items[gid]
	if !ok {
		return
	}
	it := c.order.Remove(el).(*cacheItem)
	delete(c.items, gid)
	c.used -= it.weight
}

// clear drops every entry.
func (c *cache) clear() {
	c.order.Init()
	clear(c.items)
	c.used = 0
}
