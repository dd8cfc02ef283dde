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
