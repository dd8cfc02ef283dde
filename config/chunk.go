package config

import (
	"bytes"
	"cmp"
	"slices"
)

// A large registry file is parsed in chunks, one after the other: its
// text is split before lines that start a [merchants.ID] table (at column
// 0), each chunk is parsed on its own (parseFile), and the chunks'
// results are joined. A chunk's parse holds a few megabytes of decoder
// state, a whole 100 000-merchant file's over 200 MB (which the process
// would keep as RSS long after) and twice the CPU time. The result is the
// whole file's or the whole file is parsed instead:
//
//   - a split inside a multi-line string, array or inline table leaves the
//     earlier chunk unterminated: a parse error;
//   - the lines of a chunk after its first table header mean what they
//     mean in the whole file (a header names its table in full), so chunks
//     can only disagree with the whole file through a key that two chunks
//     both define: an entry ([merchants.ID], [providers.NAME]) in two
//     chunks, or a top-level table ([merchants], merchants = {...}) that
//     one chunk defines itself while another adds to it;
//
// so any problem in any chunk, an entry in two chunks, or a chunk that
// defines a top-level key itself, sends the file to the whole-file parse,
// which gives the problems with the exact messages and lines.

// chunkBytes is the size of a chunk: small enough that the parser's
// maps stay small (a parse of the whole file spends a third of its time
// growing maps of hundreds of thousands of keys), large enough that the
// join costs little.
const chunkBytes = 64 << 10

// chunks returns how many chunks a file of size bytes is parsed in.
func chunks(size int) int { return max(1, size/chunkBytes) }

// chunkHeader starts the lines a file is split before.
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

// parseChunked parses src in n chunks; nil when n < 2, when src cannot
// be cut, or when the chunks' result could differ from the whole file's
// (see above): the caller then parses the whole file.
func parseChunked(src Source, lookupEnv func(string) (string, bool), n int) *File {
	if n < 2 {
		return nil
	}
	cuts := splitPoints(src.Data, n)
	if len(cuts) == 0 {
		return nil
	}
	bounds := append(append([]int{0}, cuts...), len(src.Data))
	files := make([]*File, len(bounds)-1)
	offsets := make([]int, len(files))
	for i := range files {
		if i > 0 {
			offsets[i] = offsets[i-1] + bytes.Count(src.Data[bounds[i-1]:bounds[i]], []byte{'\n'})
		}
		files[i] = parseFile(Source{Path: src.Path, Data: src.Data[bounds[i]:bounds[i+1]]}, lookupEnv)
		if len(files[i].errs) > 0 {
			return nil
		}
	}
	return joinChunks(files, offsets)
}

// joinChunks joins the files parsed from the chunks of one file, whose
// first lines are offsets[i]+1 of the whole file; nil when they cannot
// be joined into the whole file's result.
func joinChunks(files []*File, offsets []int) *File {
	out := &File{Path: files[0].Path, dir: files[0].dir}
	total := 0
	for _, f := range files {
		if len(f.errs) > 0 || f.flags != nil || f.wildcardFlags != 0 || f.topDefined ||
			f.merchantsType != "" && f.merchantsType != "Hash" {
			return nil
		}
		total += len(f.merchants)
	}
	out.merchants = make([]Merchant, 0, total)
	for i, f := range files {
		off := offsets[i]
		out.Merchants += f.Merchants
		out.inputs.add(f.inputs)
		if f.merchantsType != "" && out.merchantsType == "" {
			out.merchantsType, out.merchantsLine = f.merchantsType, shift(f.merchantsLine, off)
		}
		for _, rp := range f.providers {
			rp.line = shift(rp.line, off)
			out.providers = append(out.providers, rp)
		}
		if f.wildcard != nil {
			if out.wildcard != nil {
				return nil
			}
			f.wildcard.Line = shift(f.wildcard.Line, off)
			out.wildcard = f.wildcard
		}
		for _, m := range f.merchants {
			m.Line = shift(m.Line, off)
			out.merchants = append(out.merchants, m)
		}
	}
	shareTerms(out.merchants)
	byName := func(a, b *rawProvider) int { return cmp.Compare(a.name, b.name) }
	slices.SortFunc(out.providers, byName)
	for i := 1; i < len(out.providers); i++ {
		if out.providers[i-1].name == out.providers[i].name {
			return nil
		}
	}
	// Each chunk's merchants are sorted: in a file in id order, so are
	// all, which the sort finds at once.
	slices.SortFunc(out.merchants, func(a, b Merchant) int { return cmp.Compare(a.ID, b.ID) })
	for i := 1; i < len(out.merchants); i++ {
		if out.merchants[i-1].ID == out.merchants[i].ID {
			return nil
		}
	}
	return out
}

// shift moves a line of a chunk to the whole file; 0 (unknown) stays.
func shift(line, offset int) int {
	if line == 0 {
		return 0
	}
	return line + offset
}
