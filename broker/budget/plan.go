package budget

import (
	"math"
	"time"
)

// maxPlanSteps bounds the slots one Plan looks at.
const maxPlanSteps = 4096

// calendar counts the refreshes planned per slot of width seconds, each
// with room for capacity (BackgroundShare of this sidecar's part of the
// rate, at least one). A count stays until its slot has passed, even if its
// token goes first: that only moves later plans earlier, within their
// window. Guarded by Budget.mu.
type calendar struct {
	width     int64 // seconds
	capacity  int32
	planned   map[int64]int32 // slot (Unix seconds / width) -> refreshes planned
	lastPrune int64
}

func newCalendar(l Limit) calendar {
	perSecond := BackgroundShare * l.PerSecond()
	width := int64(1)
	if perSecond < 1 {
		width = int64(min(math.Ceil(1/perSecond), 3600))
	}
	return calendar{width: width, capacity: int32(max(1, min(perSecond*float64(width), math.MaxInt32))), planned: map[int64]int32{}}
}

// slot is the slot holding t.
func (c *calendar) slot(t time.Time) int64 {
	return floorDiv(t.Unix(), c.width)
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && a < 0 {
		q--
	}
	return q
}

// Plan picks when a refresh planned in [earliest, latest] goes: latest, or
// the latest time a whole number of slots before it whose slot has room,
// else earliest; the refresh is counted in its slot.
func (b *Budget) Plan(earliest, latest time.Time) time.Time {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	c := &b.cal
	c.prune(c.slot(now))
	at := earliest
	step := time.Duration(c.width) * time.Second
	for t, i := latest, 0; !t.Before(earliest) && i < maxPlanSteps; t, i = t.Add(-step), i+1 {
		if c.planned[c.slot(t)] < c.capacity {
			at = t
			break
		}
	}
	c.planned[c.slot(at)]++
	return at
}

// prune drops the slots before cur, at most once a minute of slots.
func (c *calendar) prune(cur int64) {
	if cur-c.lastPrune < 60 && cur >= c.lastPrune {
		return
	}
	c.lastPrune = cur
	for s := range c.planned {
		if s < cur {
			delete(c.planned, s)
		}
	}
}
