"""A corpus with known answers for the curation pipeline: planted duplicates, near duplicates at
controlled 5-gram Jaccard similarity, far variants, and quality, language and content plants.

    docs, truth = make_corpus(10_000, seed=0)

Base documents are English sentences of common words drawn at random (so unrelated documents
share no 5-gram). A near variant copies a base document and replaces runs of words (and adds
a word at the front for fine control) until the Jaccard similarity of the two documents' 5-gram
shingle sets (lm.data.curate.minhash.shingles, the pipeline's own shingling) reaches its target:
0.95, 0.9, 0.85 or 0.8 (duplicates: one of the pair should go), or 0.3 (a far variant: both
should stay). `truth[i]` says what each document is: {id, plant, group, target_j, true_j, expect},
where expect is the stage that should remove it (None: it should be kept; for a duplicate pair
either member may be the one removed).
"""

from __future__ import annotations

import random

from lm.data.curate.minhash import jaccard, shingles

WORDS = ('time year people way day man thing woman life child world school state family student group '
         'country problem hand part place case week company system program question work government number '
         'night point home water room mother area money story fact month lot right study book eye job word '
         'business issue side kind head house service friend father power hour game line end member law car '
         'city community name president team minute idea kid body information back parent face others level '
         'office door health person art war history party result change morning reason research girl guy '
         'moment air teacher force education river garden window letter village market doctor music field '
         'good new first last long great little own other old right big high different small large next early '
         'young important few public bad same able open simple quiet bright green warm cold heavy ready '
         'say get make know think take see come want look use find give tell ask seem feel try leave call '
         'keep begin help show hear play run move live believe hold bring happen write provide sit stand '
         'lose pay meet include continue learn lead understand watch follow stop create speak read spend '
         'grow walk win offer remember love consider appear buy wait serve send expect build stay fall '
         'the be to of and that have with a in it for on as at by this from they we or an will one all '
         'would there their what so up out if about who which when can no just him into your some could '
         'them other than then now only its over also after how our even because any these most us').split()
STOP = ('the', 'of', 'and', 'to', 'that', 'with', 'have', 'be')
FRENCH = ('le la les un une des et est dans pour pas que qui sur avec plus nous vous ils elle être avoir '
          'faire dire aller voir savoir pouvoir vouloir venir temps maison jour année monde vie homme femme '
          'enfant ville pays travail chose main partie famille histoire toujours aussi très bien petit grand '
          'nouveau premier dernier beaucoup encore jamais depuis pendant entre leur notre votre cette').split()
GERMAN = ('der die das und ist nicht ein eine zu mit von auf für sich dem den auch es an werden aus er hat '
          'dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber '
          'vor zur bis mehr durch man sein wurde sei Zeit Jahr Stadt Land Haus Arbeit Leben Kinder Welt').split()
KANJI = ('日国人年大本中長出同時政事自行社見月分議後前民生連発間対上部東者地合市業内相方定今回新場金員'
         '入立開手力学問高代明実関決子動京全目表戦経通外最言現理調体化田当主題下意法来作性要用制治度務強気'
         '小成期公持野協取都和機平総加山思家話世受区領多県続進正安設保改数記院女初北午指権心界支産結百点教')
JA_PLACES = ('公園', '駅の近く', '図書館', '学校', '川の岸', '山の上', '町の店', '家の庭', '海の近く', '大学')
JA_VERBS = ('を読みました', 'を見つけました', 'について話しました', 'を調べています', 'を作りました',
            'を買いに行きました', 'のことを考えていました', 'を友達に見せました', 'を書いています')
NEAR_TARGETS = (0.95, 0.9, 0.85, 0.8)
FAR_TARGET = 0.3
QUALITY_KINDS = ('short', 'repeated_lines', 'lorem_ipsum', 'curly_braces', 'bullets', 'symbols')
PLANTED_PII = ('jane.roe{i}@mail.example.com', '555-{a:03d}-{b:04d}', '10.{a}.{c}.{d}')


def sentence(rng: random.Random, vocab=WORDS, lo=8, hi=16) -> str:
    words = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
    words[rng.randrange(len(words))] = rng.choice(STOP) if vocab is WORDS else words[0]
    return ' '.join(words).capitalize() + '.'


def japanese_sentence(rng: random.Random) -> str:
    """'<name>さんは<place>で<word>の<thing><verb>。' with random two-kanji names and words."""
    word = lambda: rng.choice(KANJI) + rng.choice(KANJI)  # noqa: E731
    return f'{word()}さんは{rng.choice(JA_PLACES)}で{word()}の{word()}{rng.choice(JA_VERBS)}。'


def paragraph_text(rng: random.Random, min_words: int, vocab=WORDS) -> str:
    """Paragraphs of 3-5 sentences, one sentence a line, until min_words."""
    paragraphs, n = [], 0
    while n < min_words:
        sents = [sentence(rng, vocab) for _ in range(rng.randint(3, 5))]
        n += sum(len(s.split()) for s in sents)
        paragraphs.append('\n'.join(sents))
    return '\n\n'.join(paragraphs)


def _tokens(text):
    return text.split(' ')


def variant(rng: random.Random, text: str, target: float, tol: float = 0.006) -> tuple[str, float]:
    """`text` edited until its 5-gram Jaccard with the original is within `tol` above `target`."""
    base = shingles(text, 5, 5, False)
    tokens = text.replace('\n', ' \n ').split(' ')
    j = 1.0
    for _ in range(10_000):
        if j <= target + tol:
            break
        trial = list(tokens)
        if j - target > 0.04:  # a run of 1-4 words replaced somewhere inside
            m = rng.randint(1, 4)
            i = rng.randrange(0, max(1, len(trial) - m))
            trial[i:i + m] = [rng.choice(WORDS) for _ in range(m)]
        else:  # a word added at the front: one new shingle, the finest step
            trial.insert(0, rng.choice(WORDS))
        t = ' '.join(trial).replace(' \n ', '\n')
        jt = jaccard(base, shingles(t, 5, 5, False))
        if jt >= target - tol:
            tokens, j = trial, jt
    out = ' '.join(tokens).replace(' \n ', '\n')
    return out, jaccard(base, shingles(out, 5, 5, False))


def _quality_plant(rng, kind, base):
    if kind == 'short':
        return sentence(rng) + ' ' + sentence(rng)
    if kind == 'repeated_lines':
        line = sentence(rng)
        return '\n'.join([line] * 12 + [sentence(rng) for _ in range(3)])
    if kind == 'lorem_ipsum':
        return base + '\nLorem ipsum dolor sit amet, consectetur adipiscing elit.'
    if kind == 'curly_braces':
        return base + '\nfunction show() { return the_value; }'
    if kind == 'bullets':
        return '\n'.join('- ' + ' '.join(rng.choice(WORDS) for _ in range(6)) for _ in range(15))
    if kind == 'symbols':
        return '\n'.join(' '.join('#' + rng.choice(WORDS) if k % 2 else rng.choice(WORDS) for k in range(10)) + '.'
                         for _ in range(8))
    raise ValueError(kind)


def make_corpus(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(documents {id, text, url}, truth) for n documents in a shuffled order."""
    rng = random.Random(seed)
    counts = {'exact': n * 3 // 100, 'far': n * 4 // 100, 'language': n * 2 // 100, 'japanese': n // 100,
              'blocked_word': n // 100, 'blocked_domain': n // 100, 'pii': n * 2 // 100}
    counts.update({f'near_{t}': n * 2 // 100 for t in NEAR_TARGETS})
    counts.update({f'quality_{k}': max(1, n * 4 // 100 // len(QUALITY_KINDS)) for k in QUALITY_KINDS})
    pairs = counts['exact'] + counts['far'] + sum(counts[f'near_{t}'] for t in NEAR_TARGETS)
    n_base = n - sum(counts.values())
    if n_base < pairs:
        raise ValueError(f'n={n} is too small for the plants')
    docs, truth = [], []

    def add(text, plant, group=None, target=None, true_j=None, expect=None, url=None):
        i = len(docs)
        docs.append({'id': f'doc-{i:07d}', 'text': text, 'url': url or f'https://site{i % 997}.example.org/page/{i}'})
        truth.append({'id': f'doc-{i:07d}', 'plant': plant, 'group': group, 'target_j': target,
                      'true_j': true_j, 'expect': expect})

    bases = [paragraph_text(rng, rng.randint(150, 300)) for _ in range(n_base)]
    for i, text in enumerate(bases):
        add(text, 'base', group=i)
    b = 0
    for _ in range(counts['exact']):  # the same text, some with different whitespace / Unicode forms
        text = bases[b]
        if rng.random() < 0.5:
            text = text.replace(' ', '  ', 3).replace('.', '\uff0e', 1)  # fullwidth full stop: NFKC folds it
        add(text, 'exact', group=b, target=1.0, true_j=1.0, expect='exact_dedup')
        truth[b]['expect'] = 'exact_dedup'
        b += 1
    for t in NEAR_TARGETS + (FAR_TARGET,):
        for _ in range(counts[f'near_{t}'] if t != FAR_TARGET else counts['far']):
            text, j = variant(rng, bases[b], t)
            expect = 'near_dedup' if t >= 0.8 else None
            add(text, 'near' if expect else 'far', group=b, target=t, true_j=round(j, 4), expect=expect)
            truth[b]['expect'] = expect
            b += 1
    for _ in range(counts['language']):
        add(paragraph_text(rng, 120, FRENCH if rng.random() < 0.5 else GERMAN), 'language', expect='language')
    for _ in range(counts['japanese']):
        add('\n'.join(''.join(japanese_sentence(rng) for _ in range(4)) for _ in range(8)), 'japanese')
    for k in QUALITY_KINDS:
        for _ in range(counts[f'quality_{k}']):
            add(_quality_plant(rng, k, paragraph_text(rng, 120)), f'quality_{k}', expect='quality')
    for _ in range(counts['blocked_word']):
        text = paragraph_text(rng, 120).replace('.', '. Claim your casino bonus now.', 1)
        add(text, 'blocked_word', expect='content')
    for _ in range(counts['blocked_domain']):
        add(paragraph_text(rng, 120), 'blocked_domain', expect='content',
            url=f'https://www.spam-casino.example/offer/{len(docs)}')
    for _ in range(counts['pii']):
        a, b4, c, d = rng.randrange(200, 999), rng.randrange(10_000), rng.randrange(256), rng.randrange(1, 255)
        pii = [PLANTED_PII[0].format(i=len(docs)), PLANTED_PII[1].format(a=a, b=b4), PLANTED_PII[2].format(a=a % 256, c=c, d=d)]
        text = paragraph_text(rng, 120)
        text += f'\nWrite to {pii[0]} or call {pii[1]} about the server at {pii[2]}.'
        add(text, 'pii', group=pii)
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order], [truth[i] for i in order]
