package config

import (
	"bytes"
	"cmp"
	"slices"
)

// A large registry file is parsed in chunks, one after the other: the
// text is cut before lines that start with "[merchants.", each chunk is
// parsed on its own (parseFile) and the results are joined. A chunk's
// parse holds a few megabytes of decoder state, a whole 100 000-merchant
// file's over 300 MB. A table header names its table in full, so a
// chunk's lines mean what they mean in the whole file, unless a cut falls
// inside a multi-line value (a problem in that chunk) or two chunks define
// one key (an entry in two chunks, a top-level table that a chunk
// defines). Either sends the file to the whole-file parse, which gives
// the problems with their exact messages and lines.

// chunkBytes is the size of a chunk: small enough that the decoder's
// maps stay small, large enough that the join costs little.
const chunkBytes = 64 << 10

// chunks returns how many chunks a file of size bytes is parsed in.
func chunks(size int) int { return max(1, size/chunkBytes) }

// chunkHeader starts the lines a file is cut before.
var chunkHeader = []byte("\n[merchants.")

// splitPoints returns the offsets at which data is cut into at most n
// chunks of about equal size: each is the start of a line that starts
// with "[merchants.". None when data cannot be cut.
func splitPoints(data []byte, n int) []int {
	var cuts []int
	from := 0
	for i := 1; i < n; i++ {
		target := max(from, len(data)*i/n-1)
		j := bytes.Index(data[target:], chunkHeader)
		if j < 0 {
			break
		}
		from = target + j + 1
		cuts = append(cuts, from)
	}
	return cuts
}

// parseChunked parses src in n chunks; nil when n < 2, when src cannot be
// cut, or when the joined result could differ from the whole file's (see
// above).
func parseChunked(src Source, lookupEnv func(string) (string, bool), n int) *File {
	if n < 2 {
		return nil
	}
	cuts := splitPoints(src.Data, n)
	if len(cuts) == 0 {
		return nil
	}
	bounds := append(append([]int{0}, cuts...), len(src.Data))
	parts := make([]*File, len(bounds)-1)
	offset := 0 // the lines of the file before the chunk
	var c compactor
	for i := range parts {
		data := src.Data[bounds[i]:bounds[i+1]]
		parts[i] = parseFile(Source{Path: src.Path, Data: data}, lookupEnv, offset, &c)
		if len(parts[i].errs) > 0 || parts[i].topDefined {
			return nil
		}
		offset += bytes.Count(data, []byte{'\n'})
	}
	out := join(parts)
	if out == nil {
		return nil
	}
	byName := func(a, b *rawProvider) int { return cmp.Compare(a.name, b.name) }
	slices.SortFunc(out.providers, byName)
	// Each chunk's merchants are sorted: in a file in id order, so are
	// all, which the sort finds at once.
	slices.SortFunc(out.merchants, func(a, b Merchant) int { return cmp.Compare(a.ID, b.ID) })
	if hasAdjacent(out.providers, func(p *rawProvider) string { return p.name }) ||
		hasAdjacent(out.merchants, func(m Merchant) string { return m.ID }) {
		return nil
	}
	return out
}

// join joins the chunks of a file, parsed without problems; nil when two
// define the wildcard entry.
func join(parts []*File) *File {
	out := &File{Path: parts[0].Path, dir: parts[0].dir}
	total := 0
	for _, f := range parts {
		total += len(f.merchants)
	}
	out.merchants = make([]Merchant, 0, total)
	for _, f := range parts {
		out.inputs.add(f.inputs)
		if out.merchantsType == "" {
			out.merchantsType, out.merchantsLine = f.merchantsType, f.merchantsLine
		}
		out.providers = append(out.providers, f.providers...)
		out.merchants = append(out.merchants, f.merchants...)
		if f.wildcard != nil && out.wildcard != nil {
			return nil
		}
		out.wildcard = cmp.Or(out.wildcard, f.wildcard)
	}
	return out
}

// hasAdjacent reports whether two neighbours of sorted have the same key.
func hasAdjacent[T any](sorted []T, key func(T) string) bool {
	for i := 1; i < len(sorted); i++ {
		if key(sorted[i-1]) == key(sorted[i]) {
			return true
		}
	}
	return false
}
