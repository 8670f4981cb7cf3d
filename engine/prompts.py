"""Every prompt of the SSP game, in one place: proposer, solver, verifier, and the tool-result block.

The texts follow the shape of the SSP reference prompts (proposer, RAG verifier, solver) in our own words. They are
chat messages; `ssp.engine.chat.ChatTokenizer` renders them once with the model's own chat template. The tag protocol
(<think>, <search>, <information>, <answer>, <question>) is shared by all roles, and the tool block written by
`information_block` is exactly what the prompts tell the model to expect.

NOTE: the simulated server (`ssp model serve --sim`) recognises the proposer by the reference's phrase "The answer I
provided is: X.", the verifier by "Using only the documents" and the question of solver and verifier prompts by
"Question: ..."; it reads only the last 512 tokens before the assistant turn
(`ssp.serving.sim_text.PROMPT_TAIL_TOKENS`), so keep these phrases, and the question, near the end of the last user
message when editing.
"""

from collections.abc import Sequence

from ssp.retriever.protocol import Doc

Message = dict[str, str]

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
QUESTION_OPEN, QUESTION_CLOSE = "<question>", "</question>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
THINK_OPEN = "<think>"

# Prefills: text that opens the assistant turn as part of the prompt (`ChatTokenizer.render(..., prefill=)`, loss mask
# 0, never sampled). Only an opening tag of the role's own protocol is allowed, so a model that follows the prompts
# (and would have written that tag itself) sees the turn it would have produced anyway, while a small model that
# never starts a tag on its own is put on the protocol's track. "" (no prefill) is SSP's behaviour.
PROPOSER_PREFILLS = ("", THINK_OPEN, SEARCH_OPEN, QUESTION_OPEN)
SOLVER_PREFILLS = ("", THINK_OPEN, SEARCH_OPEN, ANSWER_OPEN)
VERIFIER_PREFILLS = ("", THINK_OPEN, ANSWER_OPEN)

_TOOL_PROTOCOL = (
    "Think step by step inside <think> and </think> whenever you receive new information. To look something up, "
    "write a query as <search> your query </search>; the top results are then shown to you between "
    "<information> and </information>. You may search as many times as you need."
)

PROPOSER_SYSTEM = (
    "You write hard search questions. You are given an answer and must work backwards to a question whose "
    "solution takes exactly the requested number of searches, each search building on the one before.\n"
    "How to build it: do not search for the answer itself. Search for something closely connected to the answer "
    "and find a fact that leads to it; then search that fact to find what leads to it, and so on, one link per "
    "search. The fact you reach last becomes the opening clue of your question.\n"
    + _TOOL_PROTOCOL
    + "\nRules: every clue must come from search results; never reveal the answer or an intermediate step in the "
    "question; the question must be impossible to answer without searching; use the requested number of "
    "searches; the question must have one unambiguous answer.\n"
    "When you are done, write the final question between <question> and </question>."
)

SOLVER_SYSTEM = "You are a careful assistant that answers questions by searching when needed."

_SOLVER_INSTRUCTION = (
    "Answer the question below. "
    + _TOOL_PROTOCOL
    + " When you know the answer, give only the answer, with no explanation, between <answer> and </answer>, "
    "for example <answer> Paris </answer>."
)

VERIFIER_SYSTEM = "You answer questions using only the documents you are given."


def proposer_messages(answer: str, hops: int) -> list[Message]:
    """The proposer's chat: the ground-truth answer and how many searches the question must need."""
    return [
        {"role": "system", "content": PROPOSER_SYSTEM},
        {
            "role": "user",
            "content": (
                f"The answer I provided is: {answer}.\n"
                f"You need to write a question about it that takes {hops} searches to solve. Before you finish, "
                "check that the question is not too easy and does not contain the answer. Put the final question "
                "between the tags, for example <question> Which river flows through the city where the author of ... was "
                "born? </question>"
            ),
        },
    ]


def solver_messages(question: str) -> list[Message]:
    """The solver's chat (Search-R1 style): the tool protocol, then the question."""
    return [
        {"role": "system", "content": SOLVER_SYSTEM},
        {"role": "user", "content": f"{_SOLVER_INSTRUCTION}\nQuestion: {question}"},
    ]


def verifier_messages(question: str, documents: str) -> list[Message]:
    """RAG verification: answer from the given documents, without searching."""
    return [
        {"role": "system", "content": VERIFIER_SYSTEM},
        {
            "role": "user",
            "content": (
                f"Documents:\n{documents}\n\n"
                "Using only the documents above, answer the question. Reason in at most 50 words, then give only "
                f"the answer between <answer> and </answer>.\nQuestion: {question}"
            ),
        },
    ]


DOC_SEPARATOR = "\n\n"
INFO_HEADER = f"\n\n{INFO_OPEN}\n"
INFO_FOOTER = f"\n{INFO_CLOSE}\n\n"
NO_RESULTS = "No results found."


def doc_pieces(docs: Sequence[Doc]) -> list[str]:
    """`render_docs(docs)` cut into the pieces the engine encodes and caches separately: each entry's header (with
    the blank line before it) and its passage. A passage is then encoded once, whether it comes back from a search
    or is shown to a verifier under another number. The cuts fall before a lone newline or after one, where
    GPT-2-style pre-tokenization splits anyway, so for such tokenizers the pieces' ids are those of the whole text;
    for others they differ only at the cuts and decode to the same text (tests check both)."""
    pieces = []
    for k, doc in enumerate(docs, start=1):
        pieces.append(f"{DOC_SEPARATOR if k > 1 else ''}Doc {k} (Title: {doc.title})\n")
        pieces.append(doc.text)
    return pieces


def render_docs(docs: Sequence[Doc]) -> str:
    """Search-R1's numbered document list: "Doc k (Title: ...)", a newline, the passage; a blank line between."""
    return "".join(doc_pieces(docs))


def information_block(docs: Sequence[Doc]) -> str:
    """The tool result appended after a </search> (loss mask 0). No documents still gives a block, so the model
    sees that the search found nothing. `ssp.engine.chat.ChatTokenizer.encode_information` encodes exactly this text."""
    return INFO_HEADER + (render_docs(docs) if docs else NO_RESULTS) + INFO_FOOTER
