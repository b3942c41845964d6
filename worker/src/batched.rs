//! Many concurrent callers' questions answered by one database round trip, generic: the resolver's
//! lookups and the budget's takes go through it.
//!
//! No caller waits for company: a round trip starts as soon as a slot is free, with every question
//! queued by then. Alone, a question is asked at once; under load, the questions arriving while the
//! round trips are in flight go together in the next one.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::ProcessError;

/// How questions are gathered.
#[derive(Debug, Clone, Copy)]
pub struct Gathering {
    /// The most questions in one round trip.
    pub most: usize,
    /// Round trips in flight at once (each holds a pooled connection while it runs).
    pub in_flight: usize,
}

struct Question<Q, A> {
    question: Q,
    reply: oneshot::Sender<Result<A, ProcessError>>,
}

/// Hands questions to the gathering loop. Cheap to clone; the loop stops when every clone is gone.
pub struct Batched<Q, A> {
    questions: mpsc::Sender<Question<Q, A>>,
}

impl<Q, A> Clone for Batched<Q, A> {
    fn clone(&self) -> Self {
        Self { questions: self.questions.clone() }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Batched<Q, A> {
    /// Starts the loop. `answer` answers many questions at once: answer `i` is question `i`'s, and
    /// an error is every question's.
    pub fn start<F, Fut>(gathering: Gathering, answer: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<A>, ProcessError>> + Send + 'static,
    {
        let (questions, receiver) = mpsc::channel(gathering.most * gathering.in_flight);
        tokio::spawn(gather(gathering, receiver, answer));
        Self { questions }
    }

    /// `question`'s answer, asked together with whatever else is waiting.
    pub async fn ask(&self, question: Q) -> Result<A, ProcessError> {
        let (reply, answer) = oneshot::channel();
        self.questions
            .send(Question { question, reply })
            .await
            .map_err(|_| ProcessError::transient("the batched lookup has stopped"))?;
        answer.await.map_err(|_| ProcessError::transient("the batched lookup stopped before answering"))?
    }
}

async fn gather<Q, A, F, Fut>(gathering: Gathering, mut receiver: mpsc::Receiver<Question<Q, A>>, answer: F)
where
    Q: Send + 'static,
    A: Send + 'static,
    F: Fn(Vec<Q>) -> Fut,
    Fut: Future<Output = Result<Vec<A>, ProcessError>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(gathering.in_flight));
    while let Some(first) = receiver.recv().await {
        // What arrives while every slot is busy joins this round trip.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut asked = vec![first];
        while asked.len() < gathering.most
            && let Ok(question) = receiver.try_recv()
        {
            asked.push(question);
        }
        let (questions, replies): (Vec<Q>, Vec<_>) = asked.into_iter().map(|q| (q.question, q.reply)).unzip();
        let answers = answer(questions);
        tokio::spawn(async move {
            let answers = answers.await.and_then(|answers| {
                if answers.len() == replies.len() {
                    Ok(answers)
                } else {
                    let (gave, asked) = (answers.len(), replies.len());
                    Err(ProcessError::transient(format!("a batched lookup gave {gave} answers to {asked} questions")))
                }
            });
            match answers {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            drop(slot);
        });
    }
}
