package config

import "strings"

// nearest returns the candidate closest to key, to suggest for a
// misspelt key: the one at the smallest edit distance (optimal string
// alignment: insertions, deletions, substitutions and transpositions of
// two neighbours, ignoring case), if that distance is small for the key's
// length (at most 1, plus 1 per 4 characters beyond 4); "" when none is
// that close. Ties go to the earlier candidate.
func nearest(key string, candidates []string) string {
	limit := 1 + max(0, len(key)-4)/4
	best, bestD := "", limit+1
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(key), strings.ToLower(c)); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance between a and b
// (bytes: keys are ASCII).
func editDistance(a, b string) int {
	// Three rows of the dynamic programme: i-2, i-1 and i.
	prev2, prev, cur := make([]int, len(b)+1), make([]int, len(b)+1), make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}
