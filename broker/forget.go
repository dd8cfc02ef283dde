package broker

// ForgetFailures drops the remembered fetch failures (see
// Options.FailureTTL) whose error match selects, so that the next lookup of
// their keys fetches again at once: after a merchant's new consent, say,
// its remembered consent_required must not outlive the cause. It returns
// how many were dropped.
func (br *Broker) ForgetFailures(match func(error) bool) int {
	n := 0
	br.failures.Range(func(k, v any) bool {
		if match(v.(*failure).err) {
			br.failures.Delete(k)
			n++
		}
		return true
	})
	return n
}

// ForgetSource drops everything the failure policy remembers about a
// source: its hold (429 Retry-After, bad credential), the failure memory
// of its keys, the failed refresh-ahead of its cached tokens and its
// circuit breaker. Call it when the source's credential changed (a key
// rotation plus a reload keeps its ID): the next lookup calls it at once.
// It returns how many key failures were dropped.
func (br *Broker) ForgetSource(sourceID string) int {
	if v, ok := br.sourceHolds.Load(sourceID); ok && br.sourceHolds.CompareAndDelete(sourceID, v) {
		sourceBackingOff(v.(*sourceHold).obs, sourceID, false)
	}
	n := 0
	br.failures.Range(func(k, v any) bool {
		if f := v.(*failure); f.b != nil && f.b.SourceID == sourceID {
			br.forget(k.(string), f)
			n++
		}
		return true
	})
	for _, it := range br.cache.Items() {
		if e := it.Object.(*Entry); e.binding.SourceID == sourceID {
			e.retry.Store(nil)
		}
	}
	br.breakers.Delete(sourceID)
	return n
}
