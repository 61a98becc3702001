"""POST /mcq and /mcq/batch: answers that can only be one of the option letters."""

from fastapi import APIRouter, Depends, Request

from service.auth import Principal, admissible, admitted, require
from service.disconnect import until_disconnected
from service.errors import APIError
from service.generation import new_id
from service.jsonbody import UnambiguousJSONRoute
from service.protocol import MCQBatchRequest, MCQBatchResponse, MCQRequest, MCQResponse

router = APIRouter(tags=["mcq"], route_class=UnambiguousJSONRoute)
any_role = require("student", "reviewer")


@router.post("/mcq", response_model=MCQResponse)
async def answer(body: MCQRequest, request: Request, principal: Principal = Depends(any_role)) -> MCQResponse:
    tutor = request.app.state.tutor
    tutor.check_model(body.model)
    question = tutor.build_question(body)
    with admitted(request):
        return await until_disconnected(request, tutor.answer_mcq(
            question, body.resolved_method, principal, new_id("mcq"), body.user, body.min_confidence))


@router.post("/mcq/batch", response_model=MCQBatchResponse)
async def answer_batch(body: MCQBatchRequest, request: Request,
                       principal: Principal = Depends(any_role)) -> MCQBatchResponse:
    """An exam set: every question is answered concurrently, results in the order given."""
    tutor = request.app.state.tutor
    settings = tutor.settings
    # Each question is admitted as a request: a batch over max_in_flight could never be admitted, and a 503 would
    # send its client retrying for ever.
    limit, setting = min((settings.max_mcq_batch, "ZEPHYR_MAX_MCQ_BATCH"), (settings.max_in_flight,
                                                                           "ZEPHYR_MAX_IN_FLIGHT"))
    if len(body.questions) > limit:
        raise APIError(400, f"a batch holds at most {limit} questions ({setting}), got {len(body.questions)}; "
                            "split it", param="questions")
    tutor.check_model(body.model)
    for i, item in enumerate(body.questions):
        tutor.check_model(item.model, param=f"questions[{i}].model")
    items = [(tutor.build_question(item, f"questions[{i}]."), item) for i, item in enumerate(body.questions)]
    with admissible(request, len(items), weight=len(items)):  # around tokenizing a batch it would refuse
        prompts = await tutor.mcq_batch_prompts(items)  # a question over the token limit refuses the batch before work
    batch_id = new_id("mcqbatch")
    # The rate limit counts questions, not requests, and only valid, admitted ones (a 503 costs no budget).
    with admitted(request, len(items), weight=len(items)):
        results = await until_disconnected(request, tutor.answer_mcq_batch(items, principal, batch_id, prompts))
    return MCQBatchResponse(id=batch_id, model=tutor.model_name, results=results)
